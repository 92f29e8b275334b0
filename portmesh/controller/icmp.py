"""ICMP errors through the controller: each goes to the container whose port it quotes, or nowhere.

A destination unreachable (fragmentation needed included, which path-MTU
discovery depends on) or a time exceeded quotes the IP header and the first 8
bytes of the packet that caused it, so the quoted ``(address, protocol, port)``
names the connection it concerns. The switch cannot match inside the quote, so
the pipeline sends these errors here, rate-limited by a meter (see
``docs/pipeline.md``); TCP and UDP data never come here.

- **Inbound** (an error addressed to a public IP): the quoted source is that
  public IP and the quoted source port one the addressee owns; the owner is
  found through the mappings, then the port blocks, as the switch last compiled
  them. The frame goes back to the switch, unchanged but for ``eth_dst``, into
  the L2 table.
- **Outbound** (an error a container sent): it may only speak about packets
  that were addressed to it, so the quoted destination must be one of its IPs
  and a port it owns. Then the frame resumes in the MAPPING table as if the
  classifier had let it pass.

Errors about ICMP echo are not handled here: conntrack relates them to the
echo request (see ``icmp_host_flows`` in the compiler).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any, Protocol

from os_ken.lib.packet import icmp, ipv4, packet

from portmesh.controller.encoding import DP, ofp, parser
from portmesh.controller.pipeline import Table
from portmesh.model.entities import Container, Proto

PROTOS = {6: Proto.TCP, 17: Proto.UDP}
ERROR_TYPES = (icmp.ICMP_DEST_UNREACH, icmp.ICMP_TIME_EXCEEDED)
PORTS = struct.Struct("!HH")


class Owners(Protocol):
    """Who owns what, as the switch's flows were last compiled (SwitchCompiler satisfies it)."""

    def owner_of(self, ip: IPv4Address, proto: Proto, port: int) -> Container | None: ...

    def backends_of(self, ip: IPv4Address, proto: Proto, port: int) -> tuple[Container, ...]: ...

    def container_at(self, port: int) -> Container | None: ...


class Verdict(enum.StrEnum):
    """What became of one ICMP error (the ``verdict`` label of the controller's counter)."""

    DELIVERED = "delivered"  # inbound, sent to the owner of the quoted port
    PASSED = "passed"  # outbound, quoted a port of the sender's: sent on
    UNOWNED = "unowned"  # inbound, nobody owns the quoted address and port: dropped
    FOREIGN = "foreign"  # outbound, quoted a port the sender does not own: dropped
    MALFORMED = "malformed"  # not an ICMP error quoting TCP/UDP, or cut short: dropped


@dataclass(frozen=True)
class Quote:
    """An ICMP error's outer addresses and the connection its quoted header names."""

    outer_src: IPv4Address
    outer_dst: IPv4Address
    icmp_type: int
    src: IPv4Address
    dst: IPv4Address
    proto: Proto
    sport: int
    dport: int


def is_icmp(frame: bytes) -> bool:
    """True for an IPv4 frame carrying ICMP (cheap: the TCP/UDP refusals share the packet-in path)."""
    return len(frame) >= 34 and frame[12:14] == b"\x08\x00" and frame[23] == 1


def quote_of(frame: bytes) -> Quote | None:
    """The error's quote, or None if ``frame`` is not an ICMP error quoting at least TCP/UDP ports."""
    try:
        pkt = packet.Packet(frame)
    except Exception:  # os-ken raises whatever struct or its parsers raise on garbage
        return None
    outer, err = pkt.get_protocol(ipv4.ipv4), pkt.get_protocol(icmp.icmp)
    if outer is None or err is None or err.type not in ERROR_TYPES:
        return None
    if not isinstance(err.data, (icmp.dest_unreach, icmp.TimeExceeded)):
        return None
    quoted = bytes(err.data.data or b"")
    try:
        inner, _cls, rest = ipv4.ipv4.parser(quoted)
    except Exception:
        return None
    proto = PROTOS.get(inner.proto)
    if proto is None or not isinstance(rest, bytes) or len(rest) < PORTS.size:
        return None
    sport, dport = PORTS.unpack_from(rest)
    return Quote(IPv4Address(outer.src), IPv4Address(outer.dst), err.type,
                 IPv4Address(inner.src), IPv4Address(inner.dst), proto, sport, dport)


def inbound(frame: bytes, owners: Owners) -> tuple[Verdict, Container | None]:
    """An error addressed to a public IP: the container it concerns, if any."""
    q = quote_of(frame)
    if q is None:
        return Verdict.MALFORMED, None
    # It must be about a packet the addressee sent: quoted source = the address it is sent to.
    owner = owners.owner_of(q.src, q.proto, q.sport) if q.src == q.outer_dst else None
    return (Verdict.DELIVERED, owner) if owner is not None else (Verdict.UNOWNED, None)


def outbound(frame: bytes, in_port: int, owners: Owners) -> Verdict:
    """An error a container sent: it passes only if it quotes a packet sent to a port the sender owns."""
    q = quote_of(frame)
    sender = owners.container_at(in_port)
    if q is None or sender is None:
        return Verdict.MALFORMED
    if q.dst not in sender.ips or sender not in owners.backends_of(q.dst, q.proto, q.dport):
        return Verdict.FOREIGN
    return Verdict.PASSED


def forward(frame: bytes, in_port: int, table_id: int, owners: Owners | None) -> tuple[Verdict, Any | None]:
    """The verdict on an ICMP error punted from ``table_id``, and the packet-out that carries it on (or None).

    From CLASSIFY it came from a container (outbound), from MAPPING it is addressed
    to a public IP (inbound). The frame is resubmitted into the pipeline rather than
    output to a port, so L2 forwarding stays the switch's business.
    """
    if owners is None:
        return Verdict.UNOWNED, None
    if table_id == Table.CLASSIFY.number:
        verdict = outbound(frame, in_port, owners)
        actions: list[Any] = [parser.NXActionResubmitTable(table_id=Table.MAPPING.number)]
    else:
        verdict, owner = inbound(frame, owners)
        if owner is None:
            return verdict, None
        # A balanced mapping's error goes to every backend (any may have sent the quoted packet; the
        # others' kernels find no socket for it and ignore it), one copy each through L2.
        q = quote_of(frame)
        targets = (owners.backends_of(q.src, q.proto, q.sport) if q is not None else ()) or (owner,)
        actions = [a for c in targets
                   for a in (parser.OFPActionSetField(eth_dst=c.mac), parser.NXActionResubmitTable(table_id=Table.L2.number))]
    if verdict not in (Verdict.PASSED, Verdict.DELIVERED):
        return verdict, None
    out = parser.OFPPacketOut(DP, buffer_id=ofp.OFP_NO_BUFFER, in_port=in_port, actions=actions, data=frame)
    return verdict, out
