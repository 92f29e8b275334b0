"""The eBPF map compiler on small hand-built states: every map's entries, and incremental == fresh.

Two hosts: h1 the gateway, h2 a compute host. a and b share 203.0.113.10 on h1, c holds
.10 and .11 on h2, d is on h1 but its port is not there yet. Checked: the packers against
``layout``'s ctypes structs, config on a gateway and on a compute host, ports and owned IPs
only for present local ports, mappings to local ports and into the tunnel to the owner's
host (none while the device is missing), balanced / filtered / health-checked mappings
kept apart as balanced entries (more in test_ebpf_compile_balancing.py), the block
prefixes, macs, networks, public IPs, and a compiler with memory giving exactly a fresh
compiler's output through a series of changes.
"""

from __future__ import annotations

import ctypes
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from portmesh.agent.ebpf import compile as ec
from portmesh.agent.ebpf import layout
from portmesh.model.config import NetworkConfig
from portmesh.model.entities import (
    Backend,
    Container,
    DesiredState,
    HealthCheck,
    Host,
    HostRole,
    Mapping,
    MappingKey,
    PortBlock,
    Proto,
    mac_for,
)

IP10 = IPv4Address("203.0.113.10")
IP11 = IPv4Address("203.0.113.11")
TCP, UDP = Proto.TCP, Proto.UDP


def container(name: str, host: str, ips: tuple[IPv4Address, ...], start: int, size: int = 1024) -> Container:
    return Container(name, host, mac_for(name), ips, PortBlock(start, size))


def mapping(ip: IPv4Address, proto: Proto, port: int, owner: str, **kw: object) -> Mapping:
    return Mapping(MappingKey(ip, proto, port), owner, **kw)  # type: ignore[arg-type]


def build_state(**overrides: object) -> DesiredState:
    hosts = {
        "h1": Host("h1", 1, IPv4Address("198.19.0.1"), HostRole.GATEWAY),
        "h2": Host("h2", 2, IPv4Address("198.19.0.2"), HostRole.COMPUTE),
    }
    cs = [
        container("a", "h1", (IP10,), 32768),
        container("b", "h1", (IP10,), 33792),
        container("c", "h2", (IP10, IP11), 34816, 256),
        container("d", "h1", (IP11,), 32768),
    ]
    ms = [
        mapping(IP10, TCP, 80, "a"),
        mapping(IP10, UDP, 53, "b"),
        mapping(IP11, TCP, 22, "c"),
        mapping(IP11, TCP, 8080, "d"),
        mapping(IP10, TCP, 443, "a", backends=(Backend("a"), Backend("b", 2))),
        mapping(IP11, TCP, 25, "c", allow=(IPv4Network("198.51.100.0/24"),)),
        mapping(IP11, TCP, 26, "c", health=HealthCheck()),
    ]
    state = DesiredState(generation=1, hosts=hosts, containers={c.name: c for c in cs}, mappings={m.key: m for m in ms})
    return replace(state, **overrides)  # type: ignore[arg-type]


STATE = build_state()
C = STATE.containers
# ifindexes on each host: local container ports and the tunnel device to the other host (d's port missing on h1)
IFX = {
    "h1": {C["a"].port_name: 11, C["b"].port_name: 12, STATE.hosts["h2"].tunnel_port: 5},
    "h2": {C["c"].port_name: 21, STATE.hosts["h1"].tunnel_port: 6},
}


def compiled(host: str, state: DesiredState = STATE, ifx: dict[str, int] | None = None) -> ec.Compiled:
    return ec.MapCompiler(host).compile(state, IFX[host] if ifx is None else ifx)


def mkey(ip: IPv4Address, proto: Proto, port: int) -> bytes:
    return bytes(layout.MappingKey(layout.be32(ip), layout.be16(port), 6 if proto is TCP else 17))


def dest(name: str, flags: int, ifindex: int, owner: int) -> bytes:
    return bytes(layout.Dest(layout.mac_bytes(C[name].mac), flags, ifindex, owner))


def test_packers_give_the_ctypes_structs_bytes() -> None:
    assert ec.mapping_key(MappingKey(IP10, UDP, 5353)) == mkey(IP10, UDP, 5353)
    assert ec.dest("02:01:02:03:04:05", 2, 7, 9) == bytes(layout.Dest(layout.mac_bytes("02:01:02:03:04:05"), 2, 7, 9))
    assert ec.block_key(IP11, 33792, 1024) == bytes(layout.BlockKey(38, layout.be32(IP11), layout.be16(33792)))
    assert ec.net_key(IPv4Network("198.18.0.0/15")) == bytes(layout.NetKey(15, layout.be32(IPv4Address("198.18.0.0"))))
    assert ec.owned_ip_key(12, IP10) == bytes(layout.OwnedIp(12, layout.be32(IP10)))
    assert ec.port_value("02:00:00:00:00:09", 12) == bytes(layout.Port(layout.mac_bytes("02:00:00:00:00:09"), 0, 12))
    cfg = ec.config_value("0a:00:00:00:00:01", "0a:00:00:00:00:02", IPv4Address("169.254.1.1"), 5, 1)
    assert cfg == bytes(layout.Config(layout.mac_bytes("0a:00:00:00:00:01"), layout.mac_bytes("0a:00:00:00:00:02"),
                                      layout.be32(IPv4Address("169.254.1.1")), 5, 1))  # fmt: skip
    assert bytes(ctypes.c_uint32(1)) == ec.ONE_U32 and bytes(ctypes.c_uint8(1)) == ec.ONE_U8


def test_every_map_of_the_layout_is_compiled() -> None:
    assert set(compiled("h1").maps) == set(layout.MAPS)


def config_of(out: ec.Compiled) -> layout.Config:
    return layout.Config.from_buffer_copy(out.maps["config"][bytes(ctypes.c_uint32(0))])


def test_gateway_host_config_routes_itself_and_a_compute_host_goes_through_the_tunnel_to_it() -> None:
    gw = config_of(compiled("h1"))
    assert (gw.flags, gw.gateway_tunnel) == (layout.CFG_GATEWAY, 0)
    assert layout.mac_text(gw.gateway_mac) == STATE.config.gateway_mac
    assert layout.mac_text(gw.virtual_mac) == STATE.config.virtual_mac
    assert gw.gateway_ip == layout.be32(STATE.config.gateway_ip)
    compute = config_of(compiled("h2"))
    assert (compute.flags, compute.gateway_tunnel) == (0, 6)  # the device vx-h1 on h2
    no_tunnel = config_of(compiled("h2", ifx={C["c"].port_name: 21}))
    assert (no_tunnel.flags, no_tunnel.gateway_tunnel) == (0, 0)  # no way out yet: NO_ROUTE, never the wrong way


def test_a_cloud_without_gateway_host_makes_every_host_its_own_gateway() -> None:
    hosts = {n: replace(h, role=HostRole.COMPUTE) for n, h in STATE.hosts.items()}
    assert config_of(compiled("h2", build_state(hosts=hosts))).flags == layout.CFG_GATEWAY


def test_ports_and_owned_ips_only_for_local_ports_that_exist() -> None:
    out = compiled("h1")
    assert out.maps["ports"] == {
        bytes(ctypes.c_uint32(11)): ec.port_value(C["a"].mac, 11),
        bytes(ctypes.c_uint32(12)): ec.port_value(C["b"].mac, 12),
    }
    assert set(out.maps["owned_ips"]) == {ec.owned_ip_key(11, IP10), ec.owned_ip_key(12, IP10)}  # not d's IP11
    assert set(compiled("h2").maps["owned_ips"]) == {ec.owned_ip_key(21, IP10), ec.owned_ip_key(21, IP11)}


def plain(entries: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """The mappings entries that are destinations (not PM_DEST_BALANCED)."""
    return {k: v for k, v in entries.items() if not layout.Dest.from_buffer_copy(v).flags & layout.DEST_BALANCED}


def test_mappings_go_to_the_local_port_or_the_tunnel_to_the_owners_host() -> None:
    h1, h2 = plain(compiled("h1").maps["mappings"]), plain(compiled("h2").maps["mappings"])
    local = {mkey(IP10, TCP, 80): dest("a", layout.DEST_LOCAL, 11, 11), mkey(IP10, UDP, 53): dest("b", layout.DEST_LOCAL, 12, 12)}
    assert h1 == {**local, mkey(IP11, TCP, 22): dest("c", layout.DEST_TUNNEL, 5, 0),
                  mkey(IP11, TCP, 26): dest("c", layout.DEST_TUNNEL, 5, 0)}  # fmt: skip
    # On h2 the sharers of .10 on h1 are behind the tunnel; d (no port on h1) is nowhere: no entry anywhere.
    assert h2 == {
        mkey(IP10, TCP, 80): dest("a", layout.DEST_TUNNEL, 6, 0),
        mkey(IP10, UDP, 53): dest("b", layout.DEST_TUNNEL, 6, 0),
        mkey(IP11, TCP, 22): dest("c", layout.DEST_LOCAL, 21, 21),
        mkey(IP11, TCP, 26): dest("c", layout.DEST_LOCAL, 21, 21),
        mkey(IP11, TCP, 8080): dest("d", layout.DEST_TUNNEL, 6, 0),
    }


def test_a_missing_device_means_no_entry_but_the_counter_stays_wanted() -> None:
    out = compiled("h1")
    assert mkey(IP11, TCP, 8080) not in out.maps["mappings"]
    special = {mkey(IP10, TCP, 443), mkey(IP11, TCP, 25)}  # 26 (health-checked, up) is plain
    assert out.stat_keys == {mkey(IP10, TCP, 80), mkey(IP10, UDP, 53), mkey(IP11, TCP, 22), mkey(IP11, TCP, 8080),
                             mkey(IP11, TCP, 26)} | special  # fmt: skip
    no_tunnel = compiled("h1", ifx={C["a"].port_name: 11})
    assert set(plain(no_tunnel.maps["mappings"])) == {mkey(IP10, TCP, 80)}
    assert no_tunnel.stat_keys == out.stat_keys


def test_balanced_and_filtered_mappings_get_balanced_entries_and_nothing_is_unsupported() -> None:
    out = compiled("h1")
    assert out.unsupported == ()
    for key in (mkey(IP10, TCP, 443), mkey(IP11, TCP, 25)):
        assert layout.Dest.from_buffer_copy(out.maps["mappings"][key]).flags & layout.DEST_BALANCED
    # A health check alone, with its backend up, is a plain mapping (as on OVS).
    assert out.maps["mappings"][mkey(IP11, TCP, 26)] == dest("c", layout.DEST_TUNNEL, 5, 0)
    assert out.denied_keys == {mkey(IP11, TCP, 25)}


@pytest.mark.parametrize(("size", "prefix"), [(1024, 38), (256, 40), (1, 48), (65536, 32), (2, 47)])
def test_block_prefix_is_the_address_and_the_ports_fixed_bits(size: int, prefix: int) -> None:
    key = layout.BlockKey.from_buffer_copy(ec.block_key(IP10, size * (65536 // size - 1), size))
    assert key.prefixlen == prefix and key.ip == layout.be32(IP10) and key.port == layout.be16(65536 - size)


def test_unaligned_block_is_refused() -> None:
    with pytest.raises(ValueError, match="aligned"):
        ec.block_key(IP10, 1000, 1024)


def test_blocks_every_container_on_each_of_its_ips() -> None:
    assert compiled("h1").maps["blocks"] == {
        ec.block_key(IP10, 32768, 1024): dest("a", layout.DEST_LOCAL, 11, 11),
        ec.block_key(IP10, 33792, 1024): dest("b", layout.DEST_LOCAL, 12, 12),
        ec.block_key(IP10, 34816, 256): dest("c", layout.DEST_TUNNEL, 5, 0),
        ec.block_key(IP11, 34816, 256): dest("c", layout.DEST_TUNNEL, 5, 0),
    }


def test_macs_local_and_remote() -> None:
    macs = compiled("h2").maps["macs"]
    assert macs == {
        bytes(layout.MacKey(layout.mac_bytes(C[n].mac))): d
        for n, d in (("a", dest("a", 2, 6, 0)), ("b", dest("b", 2, 6, 0)), ("c", dest("c", 1, 21, 21)), ("d", dest("d", 2, 6, 0)))
    }


def test_networks_pools_protected_and_link_local() -> None:
    cfg = NetworkConfig(public_pools=(IPv4Network("203.0.113.0/25"), IPv4Network("203.0.113.128/25")),
                        protected_networks=(IPv4Network("198.18.0.0/15"), IPv4Network("203.0.113.128/25")))  # fmt: skip
    nets = compiled("h1", build_state(config=cfg)).maps["networks"]
    kinds = {(k.prefixlen, str(IPv4Address(k.ip.to_bytes(4, "little")))): int.from_bytes(v, "little")
             for k, v in ((layout.NetKey.from_buffer_copy(k), v) for k, v in nets.items())}  # fmt: skip
    assert kinds == {
        (25, "203.0.113.0"): layout.NET_POOL,
        (25, "203.0.113.128"): layout.NET_PROTECTED,  # a pool also protected: fenced, never served
        (15, "198.18.0.0"): layout.NET_PROTECTED,
        (16, "169.254.0.0"): layout.NET_LINK_LOCAL,
    }


def test_public_ips_every_address_any_container_holds() -> None:
    assert compiled("h1").maps["public_ips"] == {IP10.packed: ec.ONE_U32, IP11.packed: ec.ONE_U32}


def snapshot(out: ec.Compiled) -> tuple[dict[str, dict[bytes, bytes]], frozenset[bytes], object, object]:
    return ({k: dict(v) for k, v in out.maps.items()}, out.stat_keys, out.unsupported, out.denied_keys)


def test_incremental_compile_equals_a_fresh_one_through_changes() -> None:
    memo = ec.MapCompiler("h1")
    state, ifx = STATE, dict(IFX["h1"])
    first = memo.compile(state, ifx)
    kept = snapshot(first)
    k80, k22 = MappingKey(IP10, TCP, 80), MappingKey(IP11, TCP, 22)
    steps = [
        lambda s, i: ({**s.mappings, k80: Mapping(k80, "b")}, i),  # one mapping moves to another owner
        lambda s, i: ({k: m for k, m in s.mappings.items() if k != k22}, i),  # one goes
        lambda s, i: ({**s.mappings, MappingKey(IP11, UDP, 9): Mapping(MappingKey(IP11, UDP, 9), "d")}, i),
        lambda s, i: (s.mappings, {**i, C["d"].port_name: 13}),  # d's port appears
        lambda s, i: (s.mappings, {k: v for k, v in i.items() if k != s.hosts["h2"].tunnel_port}),  # tunnel gone
        lambda s, i: ({**s.mappings, k22: Mapping(k22, "c", allow=(IPv4Network("198.51.100.0/24"),))}, i),
        lambda s, i: ({**s.mappings, k22: Mapping(k22, "c")}, {**i, s.hosts["h2"].tunnel_port: 7}),
        lambda s, i: (s.mappings, i),  # nothing changed
    ]
    for step in steps:
        mappings, ifx = step(state, ifx)
        state = replace(state, mappings=mappings)
        got = memo.compile(state, ifx)
        assert snapshot(got) == snapshot(ec.MapCompiler("h1").compile(state, ifx))
    assert snapshot(first) == kept  # an earlier result is never mutated by a later compile


def test_unchanged_maps_are_handed_out_again_as_the_same_objects() -> None:
    memo = ec.MapCompiler("h1")
    one = memo.compile(STATE, IFX["h1"])
    k80 = MappingKey(IP10, TCP, 80)
    moved = {**STATE.mappings, k80: Mapping(k80, "b")}
    two = memo.compile(replace(STATE, mappings=moved), IFX["h1"])
    assert all(two.maps[n] is one.maps[n] for n in layout.MAPS if n != "mappings")
    assert two.maps["mappings"] is not one.maps["mappings"] and two.stat_keys is one.stat_keys
    # A new snapshot holding the same objects (what the store's mirror hands out): nothing is rebuilt.
    three = memo.compile(replace(STATE, mappings=dict(moved)), dict(IFX["h1"]))
    assert three.maps["mappings"] is two.maps["mappings"] and three.maps["ports"] is one.maps["ports"]


def test_compile_host_remembers_a_compiler_per_host() -> None:
    assert snapshot(ec.compile_host(STATE, "h2", IFX["h2"])) == snapshot(compiled("h2"))
    assert snapshot(ec.compile_host(STATE, "h2", IFX["h2"])) == snapshot(compiled("h2"))
