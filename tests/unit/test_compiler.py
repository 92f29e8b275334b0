"""Tier 1: the pure flow compiler, the pipeline declaration and the encoder."""

from __future__ import annotations

import itertools
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portmesh.controller.compiler import compile_switch
from portmesh.controller.encoding import EncodingCache, bundle_add, encode_add, flow_mod_add
from portmesh.controller.flows import OwnerKind, flow
from portmesh.controller.pipeline import Table, render_markdown
from portmesh.model.config import DEFAULT_CONFIG as CFG
from portmesh.model.entities import Backend, DesiredState, Host, MappingKey, Proto
from portmesh.model.validation import new_container, new_mapping, with_backend, without_backend

IP10 = IPv4Address("203.0.113.10")


def state_with(n: int) -> DesiredState:
    state = DesiredState(hosts={"h1": Host("h1", 1)})
    for i in range(n):
        c = new_container(state, CFG, name=f"c{i}", host="h1", ips=[IP10])
        state = replace(state, containers={**state.containers, c.name: c})
        m = new_mapping(state, MappingKey(IP10, Proto.TCP, 1000 + i), c.name)
        state = replace(state, mappings={**state.mappings, m.key: m})
    return state


def test_compile_is_deterministic_and_owner_scoped() -> None:
    state = state_with(3)
    ports = {c.port_name: i for i, c in enumerate(state.containers.values(), 1)}
    a = compile_switch(state, CFG, "h1", ports)
    b = compile_switch(state, CFG, "h1", ports)
    assert a == b
    # Removing one mapping changes only that mapping's flows.
    key = MappingKey(IP10, Proto.TCP, 1001)
    smaller = replace(state, mappings={k: m for k, m in state.mappings.items() if k != key})
    c = compile_switch(smaller, CFG, "h1", ports)
    gone = set(a) - set(c)
    assert gone and all(a[k].owner_kind == OwnerKind.MAPPING and a[k].owner == str(key) for k in gone)
    assert set(c) <= set(a)


def test_container_without_port_gets_no_port_flows() -> None:
    state = state_with(1)
    flows = compile_switch(state, CFG, "h1", {})
    assert not any(f.table is Table.L2 and f.owner_kind == OwnerKind.CONTAINER for f in flows.values())


def test_table_rejects_undeclared_field_and_jump() -> None:
    with pytest.raises(ValueError, match="does not match on"):
        flow(Table.L2, 1, OwnerKind.HOST, "h", (), None, ipv4_dst="1.2.3.4")
    with pytest.raises(ValueError, match="may not go to"):
        flow(Table.MAPPING, 1, OwnerKind.HOST, "h", (), Table.CLASSIFY)


def test_pipeline_document_matches_module() -> None:
    doc = Path(__file__).parents[2] / "docs" / "pipeline.md"
    assert doc.read_text() == render_markdown(), "regenerate: python -m portmesh.controller.pipeline > docs/pipeline.md"


def test_cached_encoding_equals_os_ken_encoding() -> None:
    state = state_with(2)
    flows = compile_switch(state, CFG, "h1", {c.port_name: i for i, c in enumerate(state.containers.values(), 7)})
    cache = EncodingCache()
    for f in flows.values():
        assert cache.add(f) == bundle_add(flow_mod_add(f))
        assert cache.add(f) is cache.add(f)


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=1, max_value=20))
def test_blocks_are_disjoint_and_aligned(n: int) -> None:
    state = state_with(n)
    blocks = [c.block for c in state.containers.values()]
    assert len(set(blocks)) == n
    for b in blocks:
        assert b.start % b.size == 0 and CFG.ephemeral_start <= b.start and b.end <= CFG.ephemeral_end
    spans = sorted((b.start, b.end) for b in blocks)
    assert all(prev[1] < nxt[0] for prev, nxt in itertools.pairwise(spans))


def test_templated_encoding_equals_os_ken_for_every_shape() -> None:
    """Every flow shape the compiler makes, with varied values: template bytes == os-ken bytes."""
    from portmesh.controller.templates import TemplateEncoder

    state = state_with(30)
    udp = new_mapping(state, MappingKey(IPv4Address("203.0.113.10"), Proto.UDP, 53), "c3")
    state = replace(state, mappings={**state.mappings, udp.key: udp})
    flows = compile_switch(state, CFG, "h1", {c.port_name: 1000 + i for i, c in enumerate(state.containers.values())})
    encoder = TemplateEncoder(encode_add)
    for f in flows.values():
        assert encoder(f) == encode_add(f), f
    assert encoder.shapes and all(encoder.shapes.values()), "some shape could not be templated"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "remove", "move", "port", "drop", "new", "backend", "unbackend",
                                           "policy", "down", "weight"]), st.integers(0, 9)),
                max_size=12))
def test_delta_equals_difference_of_full_compiles(steps: list[tuple[str, int]]) -> None:
    """Applying each delta to the previous flow set gives exactly the next full compile."""
    from portmesh.controller.compiler import SwitchCompiler

    state = state_with(4)
    names = sorted(state.containers)
    ports = {state.containers[n].port_name: i for i, n in enumerate(names, 1)}
    incremental = SwitchCompiler(CFG, "h1")
    held = set(incremental.compile(state, ports))
    for step, (op, n) in enumerate(steps):
        key = MappingKey(IP10, Proto.UDP, 2000 + n)
        if op == "add" and key not in state.mappings:
            m = new_mapping(state, key, names[n % len(names)])
            state = replace(state, mappings={**state.mappings, key: m})
        elif op == "remove" and state.mappings:
            victim = sorted(state.mappings)[n % len(state.mappings)]
            state = replace(state, mappings={k: v for k, v in state.mappings.items() if k != victim})
        elif op == "move" and key in state.mappings:
            others = [c for c in names if c != state.mappings[key].container]
            if others:
                m = replace(state.mappings[key], container=others[n % len(others)], backends=())
                state = replace(state, mappings={**state.mappings, key: m})
        elif op == "backend" and key in state.mappings:
            m = state.mappings[key]
            extra = [c for c in names if c not in m.names]
            if extra:
                m = with_backend(state, m, extra[n % len(extra)], 1 + n % 3)
                state = replace(state, mappings={**state.mappings, key: m})
        elif op == "unbackend" and key in state.mappings and state.mappings[key].balanced:
            m = state.mappings[key]
            m = without_backend(m, m.names[1 + n % (len(m.names) - 1)])
            state = replace(state, mappings={**state.mappings, key: m})
        elif op == "weight" and key in state.mappings:
            m = state.mappings[key]
            b = m.backends[-1]
            m = replace(m, backends=(*m.backends[:-1], Backend(b.container, 1 + (b.weight + n) % 4)))
            state = replace(state, mappings={**state.mappings, key: m})
        elif op == "policy" and key in state.mappings:
            nets = (IPv4Network("198.51.100.0/25"), IPv4Network("198.51.100.128/25"))
            m = replace(state.mappings[key], allow=nets[: n % 2], deny=(IPv4Network(f"198.51.100.{n}/32"),) if n > 4 else ())
            state = replace(state, mappings={**state.mappings, key: m})
        elif op == "down" and key in state.mappings:
            m = state.mappings[key]
            m = replace(m, down=m.down ^ {m.names[n % len(m.names)]})
            state = replace(state, mappings={**state.mappings, key: m})
        elif op == "port":
            ports = {**ports, state.containers[names[n % len(names)]].port_name: 100 + step}  # fresh number
        elif op == "drop" and len(names) > 1:
            gone = names.pop(n % len(names))
            state = replace(state, containers={k: c for k, c in state.containers.items() if k != gone},
                            mappings={k: m for k, m in state.mappings.items() if m.container != gone})
            # A dropped container that is another mapping's non-first backend stays named: the compiler skips it.
        elif op == "new" and f"n{n}" not in state.containers:
            c = new_container(state, CFG, name=f"n{n}", host="h1", ips=[IP10])
            state = replace(state, containers={**state.containers, c.name: c})
            names.append(c.name)
            ports = {**ports, c.port_name: 200 + step}
        added, removed = incremental.delta(state, ports)
        assert removed <= held
        held = (held - removed) | {f.cookie for f in added}
        assert held == set(compile_switch(state, CFG, "h1", ports)), (op, n)


def test_mapping_fast_path_builds_what_flow_builds() -> None:
    """mapping_flows uses pre-built shapes; the flows (and so the cookies) equal the generic constructor's."""
    from portmesh.controller.flows import SetField
    from portmesh.controller.rules import DST_FIELD, IPPROTO, PRIO_ALLOW, PRIO_SERVICE, SRC_FIELD, mapping_flows

    state = state_with(2)
    for proto in Proto:
        key = MappingKey(IPv4Address("203.0.113.10"), proto, 443)
        owner = state.containers["c1"]
        m = new_mapping(state, key, "c1")
        got = list(mapping_flows(m, owner, 7))
        ip, p = "203.0.113.10", IPPROTO[proto]
        want = [
            flow(Table.MAPPING, PRIO_SERVICE, OwnerKind.MAPPING, str(key), (SetField("eth_dst", owner.mac),),
                 Table.L2, eth_type=0x0800, ipv4_dst=ip, ip_proto=p, **{DST_FIELD[proto]: 443}),
            flow(Table.CLASSIFY, PRIO_ALLOW, OwnerKind.MAPPING, str(key), (), Table.MAPPING, in_port=7,
                 eth_src=owner.mac, eth_type=0x0800, ipv4_src=ip, ip_proto=p, **{SRC_FIELD[proto]: 443}),
        ]
        assert got == want
        assert [f.cookie for f in got] == [f.cookie for f in want]
        assert [f.shape for f in got] == [f.shape for f in want]


def _first_match(flows: dict[int, object], table: Table, packet: dict[str, object]) -> object:
    """The highest-priority flow of ``table`` matching ``packet`` (exact and masked IPv4/port fields)."""
    from ipaddress import IPv4Address as A

    from portmesh.controller.flows import Flow

    def hit(field: str, want: object) -> bool:
        have = packet.get(field)
        if have is None:
            return False
        if isinstance(want, tuple):
            value, mask = want
            if isinstance(value, str):
                return int(A(str(have))) & int(A(mask)) == int(A(value)) & int(A(mask))
            return int(str(have)) & int(mask) == int(value) & int(mask)
        return str(have) == str(want)

    best = [f for f in flows.values() if isinstance(f, Flow) and f.table is table
            and all(hit(k, v) for k, v in dict(f.match).items())]
    return max(best, key=lambda f: f.priority)


@pytest.mark.parametrize(
    ("dst", "proto", "port", "fate"),
    [
        ("198.51.100.2", 6, 80, "L2"),  # the outside: on to the gateway MAC's LOCAL port
        ("169.254.1.1", 6, 22, "drop"),  # the gateway address itself: nothing listens there for containers
        ("169.254.169.254", 6, 80, "drop"),  # a cloud's metadata service: not the containers' business
        ("169.254.7.7", 17, 53, "drop"),
        ("198.18.0.1", 6, 6653, "drop"),  # the management network (controller)
        ("198.19.255.1", 17, 4789, "drop"),  # the rest of the protected /15 (underlay)
        ("169.254.1.1", 1, None, "echo"),  # the switch answers ping to the gateway
    ],
)
def test_mapping_fences_link_local_and_protected_networks(dst: str, proto: int, port: int | None, fate: str) -> None:
    """What may go on to L2 (and so to LOCAL through the gateway MAC) from a container port."""
    from portmesh.controller.flows import Flow, Output

    state = state_with(1)
    flows = compile_switch(state, CFG, "h1", {state.containers["c0"].port_name: 1})
    packet: dict[str, object] = {"in_port": 1, "eth_type": 0x0800, "ipv4_dst": dst, "ip_proto": proto}
    if proto == 1:
        packet["icmpv4_type"] = 8
    else:
        packet["tcp_dst" if proto == 6 else "udp_dst"] = port
    got = _first_match(flows, Table.MAPPING, packet)
    assert isinstance(got, Flow)
    if fate == "L2":
        assert got.goto is Table.L2 and not got.actions
    elif fate == "drop":
        assert got.goto is None and not got.actions, got
    else:
        assert got.actions[-1] == Output(0xFFFFFFF8) and got.goto is None, got


def test_only_the_gateway_mac_leads_to_local() -> None:
    from portmesh.controller.flows import OFPP_LOCAL, Output

    state = state_with(2)
    flows = compile_switch(state, CFG, "h1", {c.port_name: i for i, c in enumerate(state.containers.values(), 1)})
    to_local = [f for f in flows.values() if Output(OFPP_LOCAL) in f.actions]
    assert [(f.table, dict(f.match)) for f in to_local] == [(Table.L2, {"eth_dst": CFG.gateway_mac})]
