"""Flow cookies depend only on what a flow is, never on Python reprs or class names.

The controller diffs a switch's flows against the desired ones by cookie alone,
so a cookie that changes without the flow changing makes the next controller
re-install every flow on every switch. These tests pin the cookies of a few
representative flows to literal integers and check that the digest's input is
the canonical text documented in portmesh/controller/flows.py.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import replace
from ipaddress import IPv4Address

from portmesh.controller.flows import (
    OFPP_IN_PORT,
    Ct,
    Flow,
    Output,
    OwnerKind,
    ToController,
    flow,
    owner_id,
    values_text,
)
from portmesh.controller.pipeline import Meter, Table
from portmesh.controller.rules import PRIO_ALLOW, PRIO_DEFAULT, PRIO_FENCE, arp_responder, mapping_flows
from portmesh.model.config import DEFAULT_CONFIG
from portmesh.model.entities import Container, DesiredState, Host, Mapping, MappingKey, Proto
from portmesh.model.validation import new_container

MAC = "02:00:00:00:00:07"
KEY = MappingKey(IPv4Address("203.0.113.10"), Proto.TCP, 443)


def _owner() -> Container:
    """The mapping's owner with a fixed MAC (mapping_flows reads only its MAC)."""
    state = DesiredState(hosts={"h1": Host("h1", 1)})
    return replace(new_container(state, DEFAULT_CONFIG, name="c1", host="h1", ips=[KEY.public_ip]), mac=MAC)


def _representative() -> dict[str, Flow]:
    rewrite, allow = mapping_flows(Mapping(KEY, "c1"), _owner(), 7)
    return {
        "mapping rewrite": rewrite,
        "mapping allowance": allow,
        "arp responder": flow(Table.ARP, PRIO_ALLOW, OwnerKind.HOST, "h1",
                              arp_responder(IPv4Address("198.51.100.1"), "02:00:00:00:00:01"),
                              eth_type=0x0806, arp_op=1, arp_tpa="198.51.100.1"),
        "drop (masked)": flow(Table.MAPPING, PRIO_FENCE, OwnerKind.HOST, "h1",
                              eth_type=0x0800, ipv4_dst=("169.254.0.0", "255.255.0.0")),
        "table miss drop": flow(Table.L2, PRIO_DEFAULT, OwnerKind.HOST, "h1"),
        "to controller": flow(Table.MAPPING, PRIO_ALLOW, OwnerKind.CONTAINER, "c1",
                              (ToController(0xFFFF, Meter.ICMP_IN),), eth_type=0x0800, ip_proto=1, icmpv4_type=3),
        "conntrack": flow(Table.CLASSIFY, PRIO_ALLOW, OwnerKind.CONTAINER, "c1",
                          (Ct(7, Table.MAPPING, commit=True, label_from="eth_src"),), in_port=7, eth_type=0x0800),
    }


# Changing any of these numbers makes every controller upgrade re-install every flow on every
# switch (the old cookies no longer name the new flows). Change them only on purpose, together
# with the encoding version ("pm1") in portmesh/controller/flows.py.
PINNED = {
    "mapping rewrite": 4608558936576625912,
    "mapping allowance": 4608558935076722878,
    "arp responder": 1447527366313685592,
    "drop (masked)": 1447527368738882056,
    "table miss drop": 1447527367776635239,
    "to controller": 3084931202131454223,
    "conntrack": 3084931201494043218,
}


def test_cookies_are_pinned() -> None:
    got = {name: f.cookie for name, f in _representative().items()}
    assert got == PINNED, {name: hex(c) for name, c in got.items()}


def test_digest_input_is_the_documented_text() -> None:
    flows = _representative()
    rewrite = flows["mapping rewrite"]
    text = (rewrite.shape.tag + values_text(rewrite.shape, rewrite.values).encode()).decode()
    assert text == "pm1;t=2;p=300;f=eth_type,ip_proto,ipv4_dst,tcp_dst;a=set_field:eth_dst;g=3;v=2048,6,203.0.113.10,443," + MAC
    drop = flows["drop (masked)"]
    text = (drop.shape.tag + values_text(drop.shape, drop.values).encode()).decode()
    assert text == "pm1;t=2;p=40;f=eth_type,ipv4_dst/m;a=;g=-;v=2048,169.254.0.0/255.255.0.0"
    arp = flows["arp responder"]
    assert arp.shape.tag.decode() == (
        "pm1;t=1;p=100;f=arp_op,arp_tpa,eth_type;a=move:eth_src:eth_dst:48 set_field:eth_src set_field:arp_op "
        "move:arp_sha:arp_tha:48 set_field:arp_sha move:arp_spa:arp_tpa:32 set_field:arp_spa output;g=-;v="
    )
    assert arp.values[-1] == OFPP_IN_PORT
    for f in flows.values():
        digest = hashlib.blake2b(f.shape.tag + values_text(f.shape, f.values).encode(), digest_size=4).digest()
        assert f.cookie == (owner_id(f.owner_kind, f.owner) << 32) | int.from_bytes(digest, "big")
        assert b"Table" not in f.shape.tag and b"SetField" not in f.shape.tag and b"Meter" not in f.shape.tag


def test_cookie_ignores_how_an_integer_is_typed() -> None:
    """An IntEnum or an int subclass with the same number is the same flow on the wire, so the same cookie."""
    class Ethertype(enum.IntEnum):
        IP = 0x0800

    a = flow(Table.MAPPING, PRIO_ALLOW, OwnerKind.HOST, "h1", (), Table.L2, eth_type=0x0800)
    b = flow(Table.MAPPING, PRIO_ALLOW, OwnerKind.HOST, "h1", (), Table.L2, eth_type=Ethertype.IP)
    assert a.cookie == b.cookie


def test_single_host_flows_are_unchanged_by_multi_host_support() -> None:
    """One host, no tunnels: the compiler's whole output is what it was before issue 12 but for the
    FROM_TUNNEL miss flow (a one-host switch upgraded to this controller re-installs nothing else)."""
    from portmesh.controller.compiler import compile_switch

    owner = _owner()
    state = DesiredState(hosts={"h1": Host("h1", 1)}, containers={"c1": owner},
                         mappings={KEY: Mapping(KEY, "c1")})
    flows = compile_switch(state, DEFAULT_CONFIG, "h1", {owner.port_name: 7})
    new = [f for f in flows.values() if f.table is Table.FROM_TUNNEL]
    old = sorted(c for c, f in flows.items() if f.table is not Table.FROM_TUNNEL)
    digest = hashlib.blake2b(b"".join(c.to_bytes(8, "big") for c in old), digest_size=8).hexdigest()
    assert sorted((dict(f.match).get("eth_dst", "miss"), f.actions) for f in new) == [
        ("02:00:00:00:00:07", (Output(7),)), ("miss", ())]
    assert digest == PINNED_SINGLE_HOST, digest


# A digest of the 35 cookies (all but FROM_TUNNEL's) of one host with one container and one mapping, the same
# as the compiler of commit d794b2c (before multi-host flows) gives.
PINNED_SINGLE_HOST = "560e04a8e1a4ebb6"
