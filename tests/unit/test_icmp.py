"""Tier 1: ICMP in the pipeline (flows the compiler makes) and in the controller (whose error is it)."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address
from typing import Any

import os_ken.base.app_manager  # noqa: F401  (os-ken import order)
import pytest
from os_ken.lib.packet import ethernet, icmp, ipv4, packet, tcp, udp

from portmesh.controller import icmp as ctl_icmp
from portmesh.controller.compiler import SwitchCompiler, compile_switch
from portmesh.controller.encoding import flow_mod_add, ofp, parser
from portmesh.controller.flows import Ct, Flow, Move, OwnerKind, ToController, flow
from portmesh.controller.icmp import Verdict
from portmesh.controller.pipeline import Meter, Table
from portmesh.controller.rules import ICMP_ZONE, WHOLE_PACKET
from portmesh.model.config import DEFAULT_CONFIG as CFG
from portmesh.model.entities import DesiredState, Host, MappingKey, Proto
from portmesh.model.validation import new_container, new_mapping

IP10 = IPv4Address("203.0.113.10")
OUTSIDE = "198.51.100.2"


def two_sharers() -> DesiredState:
    """web1 (80/tcp) and web2 (8080/tcp, 53/udp) on 203.0.113.10."""
    state = DesiredState(hosts={"h1": Host("h1", 1)})
    for name, proto, port in (("web1", Proto.TCP, 80), ("web2", Proto.TCP, 8080), ("web2", Proto.UDP, 53)):
        if name not in state.containers:
            c = new_container(state, CFG, name=name, host="h1", ips=[IP10])
            state = replace(state, containers={**state.containers, name: c})
        m = new_mapping(state, MappingKey(IP10, proto, port), name)
        state = replace(state, mappings={**state.mappings, m.key: m})
    return state


STATE = two_sharers()
PORTS = {STATE.containers["web1"].port_name: 1, STATE.containers["web2"].port_name: 2}


def flows() -> list[Flow]:
    return list(compile_switch(STATE, CFG, "h1", PORTS).values())


def compiled() -> SwitchCompiler:
    compiler = SwitchCompiler(CFG, "h1")
    compiler.compile(STATE, PORTS)
    return compiler


def icmp_flows(table: Table) -> list[Flow]:
    return [f for f in flows() if f.table is table and dict(f.match).get("ip_proto") == 1]


# -- flows -----------------------------------------------------------------------------------------


def test_container_icmp_is_echo_tracked_errors_checked_rest_dropped() -> None:
    mine = [f for f in icmp_flows(Table.CLASSIFY) if dict(f.match).get("in_port") == 1]
    by_type = {dict(f.match)["icmpv4_type"]: f for f in mine}
    assert set(by_type) == {8, 3, 11}, "only echo requests and errors; nothing matches ICMP of any type"
    echo = by_type[8]
    assert echo.actions == (Ct(ICMP_ZONE, commit=True, label_from="eth_src"),) and echo.goto is Table.MAPPING
    assert dict(echo.match)["eth_src"] == STATE.containers["web1"].mac  # the label is the checked source MAC
    for t in (3, 11):
        assert by_type[t].actions == (ToController(WHOLE_PACKET, Meter.ICMP_OUT),) and by_type[t].goto is None


def test_icmp_from_outside_is_tracked_and_errors_go_to_the_controller() -> None:
    local = [f for f in icmp_flows(Table.CLASSIFY) if dict(f.match).get("in_port") == 0xFFFFFFFE]
    assert {dict(f.match)["icmpv4_type"] for f in local} == {0, 3, 11}
    assert all(f.actions == (Ct(ICMP_ZONE, Table.MAPPING),) for f in local)
    mapping = icmp_flows(Table.MAPPING)
    tracked = [f for f in mapping if "ct_state" in dict(f.match)]
    assert len(tracked) == 2 and all(f.actions == (Move("ct_label", "eth_dst", 48),) for f in tracked)
    errors = [f for f in mapping if f.actions and isinstance(f.actions[0], ToController)]
    assert {(dict(f.match)["ipv4_dst"], dict(f.match)["icmpv4_type"]) for f in errors} == {(str(IP10), 3), (str(IP10), 11)}
    assert all(f.actions == (ToController(WHOLE_PACKET, Meter.ICMP_IN),) for f in errors)


def test_ct_recirculation_is_checked_like_a_goto() -> None:
    with pytest.raises(ValueError, match="may not go to"):
        flow(Table.MAPPING, 1, OwnerKind.HOST, "h", (Ct(ICMP_ZONE, Table.CLASSIFY),))


def test_encoding_carries_the_meter_and_the_ct_action() -> None:
    error_flow = next(f for f in icmp_flows(Table.MAPPING) if f.actions and isinstance(f.actions[0], ToController))
    mod = flow_mod_add(error_flow)
    assert isinstance(mod.instructions[0], parser.OFPInstructionMeter)
    assert mod.instructions[0].meter_id == Meter.ICMP_IN.meter_id
    (out,) = mod.instructions[1].actions
    assert out.port == ofp.OFPP_CONTROLLER and out.max_len == WHOLE_PACKET
    echo = next(f for f in icmp_flows(Table.CLASSIFY) if isinstance(f.actions[0], Ct) and f.actions[0].commit)
    (ct,) = flow_mod_add(echo).instructions[0].actions
    assert isinstance(ct, parser.NXActionCT) and ct.flags == 1 and ct.zone_ofs_nbits == ICMP_ZONE
    assert ct.recirc_table == 0xFF and ct.actions[0].dst_field == "ct_label"


def test_meters_are_distinct() -> None:
    assert len({m.meter_id for m in Meter}) == len(Meter)


# -- who owns what ---------------------------------------------------------------------------------


def test_owner_by_mapping_then_block() -> None:
    c = compiled()
    w1, w2 = STATE.containers["web1"], STATE.containers["web2"]
    assert c.owner_of(IP10, Proto.TCP, 80) == w1
    assert c.owner_of(IP10, Proto.UDP, 53) == w2
    assert c.owner_of(IP10, Proto.TCP, 53) is None
    assert c.owner_of(IP10, Proto.UDP, w1.block.start) == w1
    assert c.owner_of(IP10, Proto.TCP, w2.block.end) == w2
    assert c.owner_of(IPv4Address("203.0.113.99"), Proto.TCP, w2.block.end) is None
    assert c.container_at(1) == w1 and c.container_at(2) == w2 and c.container_at(3) is None


# -- frames ----------------------------------------------------------------------------------------


def frame(src: str, dst: str, layers: list[Any], proto: int, src_mac: str = "02:00:00:00:00:aa",
          dst_mac: str = "02:00:00:00:00:bb") -> bytes:
    p = packet.Packet()
    p.add_protocol(ethernet.ethernet(dst=dst_mac, src=src_mac))
    p.add_protocol(ipv4.ipv4(src=src, dst=dst, proto=proto))
    for layer in layers:
        p.add_protocol(layer)
    p.serialize()
    return bytes(p.data)


def quote(src: str, dst: str, proto: Proto, sport: int, dport: int) -> bytes:
    layer = tcp.tcp(src_port=sport, dst_port=dport) if proto is Proto.TCP else udp.udp(src_port=sport, dst_port=dport)
    return frame(src, dst, [layer, b"12345678"], 6 if proto is Proto.TCP else 17)[14:42]


def error(src: str, dst: str, quoted: bytes, type_: int = 3, code: int = 4) -> bytes:
    body = icmp.dest_unreach(data=quoted, mtu=1280) if type_ == 3 else icmp.TimeExceeded(data=quoted)
    return frame(src, dst, [icmp.icmp(type_=type_, code=code, data=body)], 1)


def test_quote_of_reads_the_quoted_connection() -> None:
    q = ctl_icmp.quote_of(error("198.51.100.1", str(IP10), quote(str(IP10), OUTSIDE, Proto.TCP, 80, 443), 11, 0))
    assert q is not None and (q.icmp_type, q.src, q.proto, q.sport, q.dport) == (11, IP10, Proto.TCP, 80, 443)
    echo = frame(OUTSIDE, str(IP10), [icmp.icmp(type_=0, data=icmp.echo(id_=1, seq=1))], 1)
    assert ctl_icmp.quote_of(echo) is None
    assert ctl_icmp.quote_of(error("198.51.100.1", str(IP10), b"\x45\x00")) is None  # cut short
    assert ctl_icmp.quote_of(b"\x00" * 60) is None
    assert ctl_icmp.is_icmp(echo) and not ctl_icmp.is_icmp(frame(OUTSIDE, str(IP10), [udp.udp(1, 2)], 17))


@pytest.mark.parametrize(("sport", "owner"), [(80, "web1"), (None, "web2")])
def test_inbound_error_goes_to_the_owner_through_l2(sport: int | None, owner: str) -> None:
    c = STATE.containers[owner]
    port = sport if sport is not None else c.block.start + 3
    data = error("198.51.100.1", str(IP10), quote(str(IP10), OUTSIDE, Proto.TCP, port, 443))
    verdict, out = ctl_icmp.forward(data, 0xFFFFFFFE, Table.MAPPING.number, compiled())
    assert verdict is Verdict.DELIVERED and out is not None
    assert out.in_port == 0xFFFFFFFE and out.data == data
    set_dst, resubmit = out.actions
    assert set_dst.value == c.mac and resubmit.table_id == Table.L2.number


def test_inbound_error_about_nobody_or_someone_else_is_dropped() -> None:
    unowned = error("198.51.100.1", str(IP10), quote(str(IP10), OUTSIDE, Proto.TCP, 9999, 443))
    elsewhere = error("198.51.100.1", str(IP10), quote("203.0.113.11", OUTSIDE, Proto.TCP, 80, 443))
    for data in (unowned, elsewhere):
        assert ctl_icmp.forward(data, 0xFFFFFFFE, Table.MAPPING.number, compiled()) == (Verdict.UNOWNED, None)
    assert ctl_icmp.forward(unowned, 0xFFFFFFFE, Table.MAPPING.number, None) == (Verdict.UNOWNED, None)


def test_container_error_passes_only_about_its_own_ports() -> None:
    w1 = STATE.containers["web1"]
    own = error(str(IP10), OUTSIDE, quote(OUTSIDE, str(IP10), Proto.TCP, 40000, 80), code=3)
    own_block = error(str(IP10), OUTSIDE, quote(OUTSIDE, str(IP10), Proto.UDP, 53, w1.block.start), code=3)
    verdict, out = ctl_icmp.forward(own, 1, Table.CLASSIFY.number, compiled())
    assert verdict is Verdict.PASSED and out is not None and out.in_port == 1
    (resubmit,) = out.actions
    assert resubmit.table_id == Table.MAPPING.number
    assert ctl_icmp.forward(own_block, 1, Table.CLASSIFY.number, compiled())[0] is Verdict.PASSED
    for foreign in (
        error(str(IP10), OUTSIDE, quote(OUTSIDE, str(IP10), Proto.TCP, 40000, 8080), code=3),  # web2's service
        error(str(IP10), OUTSIDE, quote(OUTSIDE, str(IP10), Proto.UDP, 53, STATE.containers["web2"].block.start)),
        error(str(IP10), OUTSIDE, quote(OUTSIDE, "203.0.113.11", Proto.TCP, 40000, 80), code=3),  # not its IP
    ):
        assert ctl_icmp.forward(foreign, 1, Table.CLASSIFY.number, compiled()) == (Verdict.FOREIGN, None)
    assert ctl_icmp.forward(own, 7, Table.CLASSIFY.number, compiled()) == (Verdict.MALFORMED, None)  # no such port
