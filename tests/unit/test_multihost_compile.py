"""Tier 1: flows for many hosts under one controller (issue 12), from the pure compiler.

Three hosts: h1 the gateway, h2 and h3 compute hosts, one container on each and
two sharing 203.0.113.10 by port across hosts. Each switch has its local
containers' ports and the tunnel ports named after the other hosts. Checked:
the exact tunnel flows, split horizon (FROM_TUNNEL never outputs to a tunnel),
shortest path (same host never goes to a tunnel, another host's container goes
to exactly its host's tunnel), the gateway MAC's way out, the shared
host-independent flows, and an ICMP error for a container on another host.
"""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address

from os_ken.lib.packet import ethernet, icmp, ipv4, packet, tcp

from portmesh.controller import icmp as ctl_icmp
from portmesh.controller.compiler import CommonFlows, SwitchCompiler, compile_switch
from portmesh.controller.flows import OFPP_IN_PORT, OFPP_LOCAL, Ct, Flow, Output
from portmesh.controller.icmp import Verdict
from portmesh.controller.pipeline import Table
from portmesh.model.config import DEFAULT_CONFIG as CFG
from portmesh.model.config import NetworkConfig
from portmesh.model.entities import DesiredState, Host, HostRole, MappingKey, Proto
from portmesh.model.validation import new_container, new_mapping

IP10 = IPv4Address("203.0.113.10")
IP11 = IPv4Address("203.0.113.11")
HOSTS = ("h1", "h2", "h3")
# (container, host, ip, mapped tcp port)
PLACES = (("a", "h1", IP11, 22), ("b", "h2", IP10, 80), ("c", "h3", IP10, 443))


def three_hosts() -> DesiredState:
    hosts = {
        name: Host(name, i, IPv4Address(f"198.19.0.{10 + i}"), HostRole.GATEWAY if i == 1 else HostRole.COMPUTE)
        for i, name in enumerate(HOSTS, 1)
    }
    state = DesiredState(hosts=hosts)
    for name, host, ip, port in PLACES:
        c = new_container(state, CFG, name=name, host=host, ips=[ip])
        state = replace(state, containers={**state.containers, name: c})
        m = new_mapping(state, MappingKey(ip, Proto.TCP, port), name)
        state = replace(state, mappings={**state.mappings, m.key: m})
    return state


STATE = three_hosts()
TUNNEL_NO = {"h1": 101, "h2": 102, "h3": 103}  # OpenFlow number of the tunnel port leading to each host


def ports_of(state: DesiredState, host: str, missing: frozenset[str] = frozenset()) -> dict[str, int]:
    """Local containers' ports (1, 2, ...) and a tunnel port to every other host (unless ``missing``)."""
    ports = {c.port_name: i for i, c in enumerate(state.containers_on(host), 1)}
    ports.update({state.hosts[h].tunnel_port: TUNNEL_NO[h] for h in HOSTS if h != host and h not in missing})
    return ports


def compiled(host: str, state: DesiredState = STATE, **kw: frozenset[str]) -> list[Flow]:
    return list(compile_switch(state, CFG, host, ports_of(state, host, **kw)).values())


def in_table(flows: list[Flow], table: Table) -> list[Flow]:
    return [f for f in flows if f.table is table]


def outputs(f: Flow) -> set[int]:
    return {a.port for a in f.actions if isinstance(a, Output)}


def l2_out(flows: list[Flow], mac: str) -> set[int]:
    """Where L2 sends a frame for ``mac`` that did not come from that MAC's own port."""
    return {p for f in in_table(flows, Table.L2) if dict(f.match) == {"eth_dst": mac} for p in outputs(f)}


def test_tunnel_ports_lead_to_from_tunnel_and_it_delivers_only_locally() -> None:
    for host in HOSTS:
        flows = compiled(host)
        tunnels = {TUNNEL_NO[h] for h in HOSTS if h != host}
        into = [f for f in in_table(flows, Table.CLASSIFY) if f.goto is Table.FROM_TUNNEL]
        assert sorted((dict(f.match)["in_port"], dict(f.match)["eth_type"]) for f in into) == \
            sorted((t, 0x0800) for t in tunnels)
        local = {c.mac: i for i, c in enumerate(STATE.containers_on(host), 1)}
        delivered = {dict(f.match)["eth_dst"]: outputs(f) for f in in_table(flows, Table.FROM_TUNNEL)
                     if dict(f.match) and "ip_proto" not in dict(f.match)}
        expected = {mac: {port} for mac, port in local.items()}
        if host == "h1":  # the gateway host: the gateway MAC leads to the host itself
            expected[CFG.gateway_mac] = {OFPP_LOCAL}
        assert delivered == expected, host
        # The miss drops; nothing else is there but, on the gateway host, the echo request commit.
        miss = [f for f in in_table(flows, Table.FROM_TUNNEL) if not dict(f.match)]
        assert len(miss) == 1 and miss[0].actions == () and miss[0].goto is None


def test_gateway_host_commits_echo_requests_from_tunnels_to_conntrack() -> None:
    echo = [f for f in in_table(compiled("h1"), Table.FROM_TUNNEL) if dict(f.match).get("icmpv4_type") == 8]
    assert len(echo) == 1
    assert dict(echo[0].match) == {"eth_dst": CFG.gateway_mac, "eth_type": 0x0800, "ip_proto": 1, "icmpv4_type": 8}
    assert echo[0].actions == (Ct(1, commit=True, label_from="eth_src"), Output(OFPP_LOCAL))
    for host in ("h2", "h3"):  # compute hosts hand nothing from a tunnel to their own kernel
        assert OFPP_LOCAL not in {p for f in in_table(compiled(host), Table.FROM_TUNNEL) for p in outputs(f)}


def test_split_horizon_from_tunnel_never_outputs_to_a_tunnel() -> None:
    for host in HOSTS:
        flows = compiled(host)
        sent = {p for f in in_table(flows, Table.FROM_TUNNEL) for p in outputs(f)}
        assert sent and not sent & set(TUNNEL_NO.values()) and OFPP_IN_PORT not in sent
        # Nothing but FROM_TUNNEL is reachable from a tunnel port: no other flow matches on one.
        assert all(dict(f.match).get("in_port") not in TUNNEL_NO.values() or f.goto is Table.FROM_TUNNEL
                   for f in flows)


def test_shortest_path_same_host_stays_remote_goes_to_exactly_the_owners_tunnel() -> None:
    for host in HOSTS:
        flows = compiled(host)
        for c in STATE.containers.values():
            want = ({dict(ports_of(STATE, host))[c.port_name]} if c.host == host else {TUNNEL_NO[c.host]})
            assert l2_out(flows, c.mac) == want, (host, c.name)
        # Every switch rewrites every mapping the same way (inbound is rewritten where it enters).
        rewrites = {(dict(f.match)["ipv4_dst"], dict(f.match)["tcp_dst"]): f.values[-1]
                    for f in in_table(flows, Table.MAPPING) if "tcp_dst" in dict(f.match)
                    and not isinstance(dict(f.match)["tcp_dst"], tuple)}
        assert rewrites == {(str(ip), port): STATE.containers[name].mac for name, _h, ip, port in PLACES}


def test_gateway_mac_leads_to_local_on_the_gateway_and_to_its_tunnel_elsewhere() -> None:
    assert l2_out(compiled("h1"), CFG.gateway_mac) == {OFPP_LOCAL}
    assert l2_out(compiled("h2"), CFG.gateway_mac) == {TUNNEL_NO["h1"]}
    assert l2_out(compiled("h3"), CFG.gateway_mac) == {TUNNEL_NO["h1"]}
    # No gateway host in the cloud: every host is its own way out.
    flat = replace(STATE, hosts={n: replace(h, role=HostRole.COMPUTE) for n, h in STATE.hosts.items()})
    assert l2_out(compiled("h2", flat), CFG.gateway_mac) == {OFPP_LOCAL}


def test_no_flow_into_a_missing_tunnel_port() -> None:
    flows = compiled("h2", missing=frozenset({"h1"}))
    assert l2_out(flows, CFG.gateway_mac) == set()  # dropped until the tunnel exists
    assert l2_out(flows, STATE.containers["a"].mac) == set()
    assert l2_out(flows, STATE.containers["c"].mac) == {TUNNEL_NO["h3"]}
    assert [dict(f.match)["in_port"] for f in in_table(flows, Table.CLASSIFY) if f.goto is Table.FROM_TUNNEL] == \
        [TUNNEL_NO["h3"]]


def test_incremental_equals_fresh_as_tunnels_and_containers_come_and_go() -> None:
    common = CommonFlows(CFG)
    compilers = {h: SwitchCompiler(CFG, h, common) for h in HOSTS}
    held = {h: set(compilers[h].compile(STATE, ports_of(STATE, h, frozenset({"h1", "h3"})))) for h in HOSTS}
    moved = replace(STATE, containers={**STATE.containers, "b": replace(STATE.containers["b"], host="h3")})
    steps = [(STATE, frozenset[str]()), (moved, frozenset[str]()), (STATE, frozenset({"h2"})), (STATE, frozenset())]
    for state, missing in steps:
        for host in HOSTS:
            ports = ports_of(state, host, missing)
            added, removed = compilers[host].delta(state, ports)
            held[host] = (held[host] - removed) | {f.cookie for f in added}
            assert held[host] == set(compile_switch(state, CFG, host, ports)), (host, missing)


def test_host_independent_flows_are_built_once_and_shared() -> None:
    common = CommonFlows(CFG)
    out = {h: SwitchCompiler(CFG, h, common).compile(STATE, ports_of(STATE, h)) for h in HOSTS}
    for name, _host, ip, port in PLACES:
        rewrite = [f for f in out["h1"].values() if f.owner == f"{ip}:{port}/tcp" and f.table is Table.MAPPING]
        assert len(rewrite) == 1
        for h in HOSTS:
            assert out[h][rewrite[0].cookie] is rewrite[0], (name, h)  # the very same object on every switch
    blocks = [c for c, f in out["h1"].items() if f.owner == "b" and f.table is Table.MAPPING]
    assert blocks and all(out["h3"][c] is out["h1"][c] for c in blocks)
    try:
        SwitchCompiler(replace(CFG, block_size=512), "h1", common)
    except ValueError:
        pass
    else:
        raise AssertionError("a compiler must not share flows built for another config")


def test_the_config_in_use_is_the_one_given() -> None:
    other = NetworkConfig(gateway_mac="0a:00:00:00:00:99")
    flows = list(compile_switch(replace(STATE, config=other), other, "h2", ports_of(STATE, "h2")).values())
    assert l2_out(flows, "0a:00:00:00:00:99") == {TUNNEL_NO["h1"]}
    assert l2_out(flows, CFG.gateway_mac) == set()


def test_icmp_error_for_a_container_on_another_host_goes_to_its_tunnel() -> None:
    """An error arriving at the gateway host for c (on h3) gets c's MAC and resumes in L2, which tunnels it."""
    compiler = SwitchCompiler(CFG, "h1")
    flows = list(compiler.compile(STATE, ports_of(STATE, "h1")).values())
    c = STATE.containers["c"]
    p = packet.Packet()
    p.add_protocol(ethernet.ethernet(dst=CFG.virtual_mac, src="02:00:00:00:00:aa"))
    p.add_protocol(ipv4.ipv4(src="198.51.100.1", dst=str(IP10), proto=1))
    inner = packet.Packet()
    inner.add_protocol(ipv4.ipv4(src=str(IP10), dst="198.51.100.2", proto=6))
    inner.add_protocol(tcp.tcp(src_port=443, dst_port=5555))
    inner.add_protocol(b"12345678")
    inner.serialize()
    p.add_protocol(icmp.icmp(type_=3, code=4, data=icmp.dest_unreach(data=bytes(inner.data)[:28], mtu=1400)))
    p.serialize()
    verdict, out = ctl_icmp.forward(bytes(p.data), OFPP_LOCAL, Table.MAPPING.number, compiler)
    assert verdict is Verdict.DELIVERED and out is not None
    set_dst, resubmit = out.actions
    assert set_dst.value == c.mac and resubmit.table_id == Table.L2.number
    assert l2_out(flows, c.mac) == {TUNNEL_NO["h3"]}
