"""The eBPF compiler's balanced / filtered / health-checked mappings (issue 15), and the sync's order for them.

Checked: the slot computation is the model's (shared with the OVS compiler), slots are the serving
backends weight-expanded, every backend is in ``backends`` with its SERVING flag, the policy trie
resolved so a longest-prefix lookup gives exactly ``Mapping.permits``, the entry's version changes
with any of that content, and the sync writes a new version before the entry and deletes the old
one after it (no window without rules, none with a mix).
"""

from __future__ import annotations

import struct
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

from portmesh.agent.ebpf import compile as ec
from portmesh.agent.ebpf import layout, sync
from portmesh.controller import balancing
from portmesh.model import slots as model_slots
from portmesh.model.entities import Backend, Mapping, MappingKey, Proto
from tests.unit.test_ebpf_compile import IFX, STATE
from tests.unit.test_ebpf_sync import CPUS, Log, fake_maps

KEY = MappingKey(IPv4Address("203.0.113.10"), Proto.TCP, 443)
KB = ec.mapping_key(KEY)
DESTS: dict[str, bytes | None] = {n: ec.dest(f"0a:00:00:00:00:0{i}", layout.DEST_LOCAL, 10 + i, 10 + i)
                                  for i, n in enumerate(("a", "b", "c", "d"), 1)}  # fmt: skip
DESTS["gone"] = None  # a container whose device is not there


def lb(*names: str, **kw: object) -> Mapping:
    weights: dict[str, int] = kw.pop("weights", {})  # type: ignore[assignment]
    return Mapping(KEY, names[0], tuple(Backend(n, weights.get(n, 1)) for n in names), **kw)  # type: ignore[arg-type]


def entry(sp: ec.Special) -> layout.Dest:
    return layout.Dest.from_buffer_copy(sp.entry)


def test_the_controller_uses_the_model_slots() -> None:
    assert balancing.slots is model_slots.slots and balancing.MAX_SLOTS == model_slots.MAX_SLOTS == layout.MAX_SLOTS


def test_slots_are_the_serving_backends_weight_expanded() -> None:
    sp = ec.special_entries(lb("a", "b", "c", weights={"c": 2}), KB, DESTS)
    e = entry(sp)
    assert e.flags == layout.DEST_BALANCED and e.ifindex == 4
    by_slot = {layout.SlotKey.from_buffer_copy(k).slot: v for k, v in sp.slots.items()}
    assert [by_slot[i] for i in range(4)] == [DESTS["a"], DESTS["b"], DESTS["c"], DESTS["c"]]
    assert all(layout.SlotKey.from_buffer_copy(k).version == e.owner for k in sp.slots)
    down = ec.special_entries(lb("a", "b", "c", weights={"c": 2}, down=frozenset({"c"})), KB, DESTS)
    assert entry(down).ifindex == 2 and set(down.slots.values()) == {DESTS["a"], DESTS["b"]}
    flags = {layout.mac_text(layout.BackendKey.from_buffer_copy(k).mac): layout.Dest.from_buffer_copy(v).flags
             for k, v in down.backends.items()}  # fmt: skip
    assert flags == {"0a:00:00:00:00:01": layout.DEST_LOCAL | layout.DEST_SERVING,
                     "0a:00:00:00:00:02": layout.DEST_LOCAL | layout.DEST_SERVING,
                     "0a:00:00:00:00:03": layout.DEST_LOCAL}  # fmt: skip
    assert entry(down).owner != e.owner  # another version: new keys, written before the flip


def test_a_backend_without_its_device_gets_no_slot_and_none_serving_means_refused() -> None:
    sp = ec.special_entries(lb("a", "gone"), KB, DESTS)
    assert entry(sp).ifindex == 1 and list(sp.slots.values()) == [DESTS["a"]]
    off = ec.special_entries(lb("a", health=None, down=frozenset({"a"})), KB, DESTS)
    assert entry(off).ifindex == 0 and not off.slots and len(off.backends) == 1  # still owns its port


def lpm(policy: dict[bytes, bytes], version: int, src: IPv4Address) -> int | None:
    """The trie's answer for src: the longest matching prefix's action."""
    best: tuple[int, int] | None = None
    for k, v in policy.items():
        key = layout.PolicyKey.from_buffer_copy(k)
        plen = key.prefixlen - 96
        net = IPv4Network((IPv4Address(struct.pack("=I", key.src)), plen))
        if key.version == version and src in net and (best is None or plen > best[0]):
            best = (plen, struct.unpack("=I", v)[0])
    return None if best is None else best[1]


def test_the_resolved_policy_answers_exactly_as_permits() -> None:
    m = lb("a", "b", allow=(IPv4Network("198.51.100.0/24"), IPv4Network("198.51.100.4/30"), IPv4Network("10.0.0.0/8")),
           deny=(IPv4Network("198.51.100.0/29"), IPv4Network("10.1.0.0/16")))  # fmt: skip
    for allow_only in (m, replace(m, allow=())):
        sp = ec.special_entries(allow_only, KB, DESTS)
        e = entry(sp)
        assert e.flags & layout.DEST_FILTERED
        assert bool(e.flags & layout.DEST_ALLOWLIST) == bool(allow_only.allow)
        for src in ("198.51.100.1", "198.51.100.5", "198.51.100.9", "10.1.2.3", "10.2.3.4", "192.0.2.1"):
            action = lpm(sp.policy, e.owner, IPv4Address(src))
            permitted = action == layout.POLICY_ALLOW if action is not None else not e.flags & layout.DEST_ALLOWLIST
            assert permitted == allow_only.permits(IPv4Address(src)), src


def test_plain_and_health_checked_mappings() -> None:
    from portmesh.model.entities import HealthCheck

    assert ec.is_plain(lb("a")) and ec.is_plain(lb("a", health=HealthCheck()))
    assert not ec.is_plain(lb("a", "b")) and not ec.is_plain(lb("a", deny=(IPv4Network("10.0.0.0/8"),)))
    assert not ec.is_plain(lb("a", health=HealthCheck(), down=frozenset({"a"})))


def test_incremental_compile_equals_fresh_through_backend_changes() -> None:
    memo = ec.MapCompiler("h1")
    state = STATE
    for change in (
        lambda m: replace(m, backends=(*m.backends, Backend("c"))),
        lambda m: replace(m, down=frozenset({"b"})),
        lambda m: replace(m, allow=(IPv4Network("198.51.100.0/24"),)),
        lambda m: replace(m, backends=m.backends[:1], down=frozenset(), allow=()),
    ):
        key = MappingKey(IPv4Address("203.0.113.10"), Proto.TCP, 443)
        mappings = dict(state.mappings)
        mappings[key] = change(mappings[key])
        state = replace(state, mappings=mappings)
        got, fresh = memo.compile(state, IFX["h1"]), ec.MapCompiler("h1").compile(state, IFX["h1"])
        assert got.maps == fresh.maps and got.stat_keys == fresh.stat_keys and got.denied_keys == fresh.denied_keys


def test_a_policy_change_writes_the_new_version_before_the_entry_and_deletes_the_old_after() -> None:
    log: Log = []
    maps, s = fake_maps(log), sync.MapSync(cpus=CPUS)
    key = MappingKey(IPv4Address("203.0.113.11"), Proto.TCP, 25)
    s.apply(maps, ec.MapCompiler("h1").compile(STATE, IFX["h1"]))
    log.clear()
    mappings = dict(STATE.mappings)
    mappings[key] = replace(mappings[key], allow=(IPv4Network("198.51.100.0/25"),), deny=(IPv4Network("198.51.100.7/32"),))
    s.apply(maps, ec.MapCompiler("h1").compile(replace(STATE, mappings=mappings), IFX["h1"]))
    ops = [(op, name) for op, name, _k in log]
    flip = ops.index(("update", "mappings"))
    assert ("update", "policy") in ops[:flip] and ("update", "slots") in ops[:flip]
    assert ("delete", "policy") in ops[flip:] and ("delete", "slots") in ops[flip:]
    assert not [o for o in ops[:flip] if o[0] == "delete"]
