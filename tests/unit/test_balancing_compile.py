"""Tier 1: compiling filtered and balanced mappings (POLICY, BALANCE, AFFINITY), weights -> slots, counters."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

from portmesh.controller.balancing import LABEL_MASK, LB_ZONE, MAX_SLOTS, N_BUCKETS, counted_flows, is_plain, mac_int, slots
from portmesh.controller.compiler import compile_switch
from portmesh.controller.counters import CookieIndex, totals
from portmesh.controller.encoding import encode_add
from portmesh.controller.flows import Ct, Flow, Resubmit, SetField
from portmesh.controller.pipeline import Table
from portmesh.controller.templates import TemplateEncoder
from portmesh.model.config import DEFAULT_CONFIG as CFG
from portmesh.model.entities import DesiredState, Host, MappingKey, Proto
from portmesh.model.validation import new_container, new_mapping, with_backend

VIP = IPv4Address("203.0.113.20")
KEY = MappingKey(VIP, Proto.TCP, 80)
PLAIN = MappingKey(VIP, Proto.TCP, 81)


def base() -> DesiredState:
    state = DesiredState(hosts={"h1": Host("h1", 1), "h2": Host("h2", 2)})
    for i, name in enumerate(("a", "b", "c", "d")):
        c = new_container(state, CFG, name=name, host="h1" if i % 2 == 0 else "h2", ips=[VIP])
        state = replace(state, containers={**state.containers, name: c})
    plain = new_mapping(state, PLAIN, "a")
    return replace(state, mappings={**state.mappings, PLAIN: plain})


def with_mapping(state: DesiredState, **kw: object) -> DesiredState:
    m = new_mapping(state, KEY, **kw)  # type: ignore[arg-type]
    return replace(state, mappings={**state.mappings, KEY: m})


def ports(state: DesiredState, host: str) -> dict[str, int]:
    return {c.port_name: i for i, c in enumerate(state.containers.values(), 1) if c.host == host}


def mine(flows: dict[int, Flow], key: MappingKey = KEY) -> list[Flow]:
    return [f for f in flows.values() if f.owner == str(key)]


def test_slots_expand_weights_reduced_and_capped() -> None:
    assert slots([("a", 1), ("b", 1), ("c", 2)]) == ["a", "b", "c", "c"]
    assert slots([("a", 10), ("b", 20)]) == ["a", "b", "b"]  # gcd
    assert slots([("a", 1), ("b", 1), ("c", 1), ("d", 1)])[:3] == slots([("a", 1), ("b", 1), ("c", 1)])  # appends
    big = slots([("a", 100), ("b", 1), ("c", 37)])
    assert len(big) <= MAX_SLOTS and set(big) == {"a", "b", "c"} and big.count("a") > big.count("c") > big.count("b")
    assert slots([]) == []


def test_plain_mapping_unchanged_by_a_balanced_neighbour() -> None:
    state = base()
    before = mine(compile_switch(state, CFG, "h1", ports(state, "h1")), PLAIN)
    after = mine(compile_switch(with_mapping(state, container=["b", "c"]), CFG, "h1", ports(state, "h1")), PLAIN)
    assert {f.cookie for f in before} == {f.cookie for f in after}
    assert is_plain(state.mappings[PLAIN])


def pinned_of(flows: list[Flow]) -> dict[int, Flow]:
    """AFFINITY's pinned flows by the MAC (as an int) their ct_label match names."""
    out = {}
    for f in flows:
        label = dict(f.match).get("ct_label")
        if f.table is Table.AFFINITY and label is not None:
            assert isinstance(label, tuple) and label[1] == LABEL_MASK
            out[int(label[0])] = f
    return out


def buckets_of(flows: list[Flow]) -> dict[int, str]:
    """AFFINITY's bucket flows: bucket number -> the MAC they choose."""
    out = {}
    for f in flows:
        m = dict(f.match)
        src = m.get("tcp_src", m.get("udp_src"))
        if f.table is Table.AFFINITY and src is not None:
            assert isinstance(src, tuple) and src[1] == 0x1FE
            mac = next(a.value for a in f.actions if isinstance(a, SetField))
            assert isinstance(mac, str) and f.actions[1] == Ct(LB_ZONE, commit=True, label_from="eth_dst")
            out[int(src[0]) >> 1] = mac
    return out


def test_balanced_mapping_flows() -> None:
    state = with_mapping(base(), container=["a", "b", "c"], weights={"c": 2})
    flows = mine(compile_switch(state, CFG, "h1", ports(state, "h1")))
    entry = [f for f in flows if f.table is Table.MAPPING]
    assert len(entry) == 1 and entry[0].goto is Table.BALANCE and entry[0].actions == ()
    balance = [f for f in flows if f.table is Table.BALANCE]
    assert len(balance) == 1 and balance[0].actions == (Ct(LB_ZONE, Table.AFFINITY),) and balance[0].goto is None
    macs = {n: state.containers[n].mac for n in "abc"}
    pinned = pinned_of(flows)
    assert set(pinned) == {mac_int(m) for m in macs.values()}
    for mac in macs.values():
        f = pinned[mac_int(mac)]
        assert f.actions == (SetField("eth_dst", mac), Resubmit(Table.L2))
        assert dict(f.match)["tcp_flags"] == (0x10, 0x10) and dict(f.match)["ct_state"] == (0x20, 0x20)
    chosen = buckets_of(flows)
    assert sorted(chosen) == list(range(N_BUCKETS))
    # Weights 1:1:2 over 256 buckets: 64, 64, 128 (within one slot count; tests/unit/test_buckets.py).
    counts = {n: list(chosen.values()).count(macs[n]) for n in "abc"}
    assert all(abs(counts[n] - want) <= 2 for n, want in (("a", 64), ("b", 64), ("c", 128))), counts
    # Allowances: on h1 for its local backends a and c (b is on h2), none on h2 for them.
    allow = [f for f in flows if f.table is Table.CLASSIFY]
    assert {dict(f.match)["eth_src"] for f in allow} == {macs["a"], macs["c"]}
    assert len(flows) == 1 + 1 + 3 + N_BUCKETS + 2


def test_udp_buckets_have_no_flags() -> None:
    state = base()
    udp = new_mapping(state, MappingKey(VIP, Proto.UDP, 53), ["b", "d"])
    state = replace(state, mappings={**state.mappings, udp.key: udp})
    flows = mine(compile_switch(state, CFG, "h1", ports(state, "h1")), udp.key)
    assert len(buckets_of(flows)) == N_BUCKETS and len(pinned_of(flows)) == 2
    assert not any("tcp_flags" in dict(f.match) or "tcp_src" in dict(f.match) for f in flows)


def test_serving_changes_move_only_their_buckets_and_pins() -> None:
    state = with_mapping(base(), container=["a", "b", "c"])
    macs = {n: c.mac for n, c in state.containers.items()}
    one = mine(compile_switch(state, CFG, "h1", ports(state, "h1")))
    m = replace(state.mappings[KEY], down=frozenset({"b"}))
    two = mine(compile_switch(replace(state, mappings={**state.mappings, KEY: m}), CFG, "h1", ports(state, "h1")))
    # b's pin goes (its connections are re-chosen); a's and c's pins stay the very same flows.
    assert set(pinned_of(two)) == {mac_int(macs["a"]), mac_int(macs["c"])}
    assert {pinned_of(one)[mac_int(macs[n])].cookie for n in "ac"} == {f.cookie for f in pinned_of(two).values()}
    b1, b2 = buckets_of(one), buckets_of(two)
    assert macs["b"] not in b2.values()
    others = [i for i in range(N_BUCKETS) if b1[i] != macs["b"] and b2[i] != b1[i]]
    assert len(others) <= N_BUCKETS / 3 / 2, "mostly b's buckets move (Maglev: bounds in test_buckets.py)"
    # Every backend down: only allowances remain (refused like an unmapped port).
    m = replace(m, down=frozenset({"a", "b", "c"}))
    none = mine(compile_switch(replace(state, mappings={**state.mappings, KEY: m}), CFG, "h1", ports(state, "h1")))
    assert none and all(f.table is Table.CLASSIFY for f in none)
    # Adding a backend keeps every pin, and moves about a quarter of the buckets, all to d.
    added = with_backend(state, state.mappings[KEY], "d", 1)
    three = mine(compile_switch(replace(state, mappings={**state.mappings, KEY: added}), CFG, "h1", ports(state, "h1")))
    assert {f.cookie for f in pinned_of(one).values()} < {f.cookie for f in pinned_of(three).values()}
    b3 = buckets_of(three)
    moved = [i for i in range(N_BUCKETS) if b3[i] != b1[i]]
    assert 50 <= len(moved) <= 96 and sum(b3[i] == macs["d"] for i in moved) >= len(moved) * 0.9


def test_filtered_single_backend_policy() -> None:
    allow, deny = IPv4Network("198.51.100.0/25"), IPv4Network("198.51.100.7/32")
    state = with_mapping(base(), container="a", allow=(allow,), deny=(deny,))
    flows = mine(compile_switch(state, CFG, "h1", ports(state, "h1")))
    entry = [f for f in flows if f.table is Table.MAPPING]
    assert len(entry) == 1 and entry[0].goto is Table.POLICY and entry[0].actions == ()
    policy = sorted((f for f in flows if f.table is Table.POLICY), key=lambda f: -f.priority)
    assert [dict(f.match).get("ipv4_src") for f in policy] == [
        ("198.51.100.7", "255.255.255.255"), ("198.51.100.0", "255.255.255.128"), None]
    deny_f, allow_f, default = policy
    assert deny_f.actions == () and deny_f.goto is None  # drop, silently
    assert allow_f.actions == (SetField("eth_dst", state.containers["a"].mac), Resubmit(Table.L2))
    assert default.actions == () and default.goto is None  # an allow list closes the rest
    allowed, denied = counted_flows(flows)
    assert allowed == {allow_f.cookie} and denied == {deny_f.cookie, default.cookie}
    # Deny only: the default continues.
    open_state = with_mapping(base(), container="a", deny=(deny,))
    default2 = [f for f in mine(compile_switch(open_state, CFG, "h1", {})) if f.table is Table.POLICY
                and "ipv4_src" not in dict(f.match)]
    assert default2[0].actions


def test_filtered_and_balanced_continue_to_balance() -> None:
    state = with_mapping(base(), container=["a", "b"], allow=(IPv4Network("198.51.100.0/24"),))
    flows = mine(compile_switch(state, CFG, "h2", ports(state, "h2")))
    permit = [f for f in flows if f.table is Table.POLICY and f.goto is not None]
    assert len(permit) == 1 and permit[0].goto is Table.BALANCE
    assert permit[0].actions == ()
    assert [f.actions for f in flows if f.table is Table.BALANCE] == [(Ct(LB_ZONE, Table.AFFINITY),)]


def test_new_shapes_encode_through_os_ken_and_templates_agree() -> None:
    state = with_mapping(base(), container=["a", "b", "c"], weights={"c": 2}, allow=(IPv4Network("198.51.100.0/24"),),
                         deny=(IPv4Network("198.51.100.7/32"),))
    udp = new_mapping(state, MappingKey(VIP, Proto.UDP, 53), ["b", "d"])
    state = replace(state, mappings={**state.mappings, udp.key: udp})
    encoder = TemplateEncoder(encode_add)
    for f in compile_switch(state, CFG, "h1", ports(state, "h1")).values():
        assert encoder(f) == encode_add(f), f


def test_counter_index_and_totals() -> None:
    state = with_mapping(base(), container=["a", "b"], deny=(IPv4Network("198.51.100.7/32"),))
    index = CookieIndex().update(state)
    flows = mine(compile_switch(state, CFG, "h1", ports(state, "h1")))
    assert PLAIN not in {k for k, _ in index.values()}
    deny = next(f for f in flows if f.table is Table.POLICY and not f.actions and f.goto is None)
    ok = next(f for f in flows if f.table is Table.POLICY and (f.actions or f.goto))
    got = totals(index, [[(deny.cookie, 2, 120), (ok.cookie, 5, 300)], [(ok.cookie, 1, 60), (12345, 9, 9)]])
    assert got[KEY] == type(got[KEY])(6, 360, 2, 120)


def test_icmp_errors_of_a_balanced_mapping_reach_every_backend() -> None:
    """An error quoting the balanced port goes to each backend; each backend may send errors about it."""
    from portmesh.controller import icmp
    from portmesh.controller.compiler import SwitchCompiler
    from tests.unit.test_icmp import error, quote

    state = with_mapping(base(), container=["a", "b", "c"])
    compiler = SwitchCompiler(CFG, "h1")
    here = ports(state, "h1")
    compiler.compile(state, here)
    data = error("198.51.100.1", str(VIP), quote(str(VIP), "198.51.100.2", Proto.TCP, 80, 443))
    verdict, out = icmp.forward(data, 0xFFFFFFFE, Table.MAPPING.number, compiler)
    assert verdict is icmp.Verdict.DELIVERED and out is not None
    assert [a.value for a in out.actions[::2]] == [state.containers[n].mac for n in "abc"]
    assert all(a.table_id == Table.L2.number for a in out.actions[1::2])
    # Outbound: backend c (on h1, port here) may quote a packet to the balanced port; d (no backend) may not.
    own = error(str(VIP), "198.51.100.2", quote("198.51.100.2", str(VIP), Proto.TCP, 40000, 80), code=3)
    c_port = here[state.containers["c"].port_name]
    assert icmp.forward(own, c_port, Table.CLASSIFY.number, compiler)[0] is icmp.Verdict.PASSED
    # Positive control above; a plain mapping's port (81, owner a) is foreign to c.
    foreign = error(str(VIP), "198.51.100.2", quote("198.51.100.2", str(VIP), Proto.TCP, 40000, 81), code=3)
    assert icmp.forward(foreign, c_port, Table.CLASSIFY.number, compiler)[0] is icmp.Verdict.FOREIGN
