"""Flows of mappings that are more than a rewrite: a firewall policy (POLICY) and/or several backends
(BALANCE + AFFINITY). Pure builders, like :mod:`portmesh.controller.rules`.

A plain mapping (one backend, no policy, serving) never comes here and compiles exactly as before
(pinned cookies). For the others every flow belongs to the mapping (owner ``str(key)``), so removing
or changing the mapping removes precisely its flows, as for a plain one.

Connection affinity without NAT, and without an upcall per connection. BALANCE sends a balanced
mapping's packets through conntrack (zone :data:`LB_ZONE`, used by nothing else) and on to AFFINITY,
where each connection's backend is remembered in its entry's ``ct_label`` (the backend's MAC in the low
48 bits: a MAC is stable, an index into the backend list is not):

- pinned: one flow per serving backend, ``ct_label`` = its MAC (TCP: only segments with ACK) -> that
  MAC, L2. A backend that stops serving or is removed loses its flow, so its connections are chosen
  afresh; every other connection keeps its backend whatever happens to the set.
- buckets: anything else (a SYN, the first datagram of a UDP flow, a connection whose backend went) is
  spread by bits 1-8 of the client's source port over 256 buckets, filled from the serving backends'
  weight-expanded slots by :func:`portmesh.model.buckets.bucket_table`; the bucket's flow commits the
  connection with the chosen MAC in ``ct_label``, sets eth_dst, L2.

Why conntrack, not ``learn`` + ``multipath`` (the first design): a multipath over the 5-tuple makes a
megaflow per connection (an upcall each) and a learned flow is a flow-table change per connection
(revalidation): 1.37 upcalls and 617 us of switch CPU per connection, x0.53 of a single backend's
connection rate. Here the megaflows match ct_state, ct_label and 8 bits of the source port: bounded, no
upcall per connection. The price is a recirculation per packet. Measured (bench/dataplane --paths
balancing --rounds 5 --interleave, one-host lab, load 0.4 before): 3 backends 5935 conn/s vs one 6403
(x0.93, was x0.53) and vs the same 3 servers by plain mappings 5789 (x1.03); 0 upcalls per connection
either way, h1's switch 112 vs 106 us of CPU per connection (was 617 vs 262).

Why the +inv packets are fine: with direct server return the switch sees only the client's half of
each connection, so OVS's userspace conntrack keeps TCP entries in SYN_SENT/CLOSING and flags many
later segments invalid (its sequence check). Such a packet still carries the entry's mark and label
(conntrack.c sets them from the connection it found), so AFFINITY matches the label and never drops on
+inv; a packet whose label names no serving backend simply takes its bucket and is committed again.
An entry lives as long as conntrack keeps it (see docs/pipeline.md, AFFINITY): one that expired while
the connection was quiet is recommitted from its bucket, the same backend while the set is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from portmesh.controller.flows import Action, Ct, Flow, OwnerKind, Resubmit, SetField, flow
from portmesh.controller.pipeline import Table
from portmesh.controller.rules import (
    CT_TRK,
    DST_FIELD,
    ETH_IP,
    IPPROTO,
    PRIO_SERVICE,
    allowance_flow,
)
from portmesh.model.buckets import BUCKET_MASK, BUCKET_SHIFT, N_BUCKETS, bucket_table
from portmesh.model.entities import Container, Mapping
from portmesh.model.slots import MAX_SLOTS, slots

# POLICY priorities: a deny beats an allow whatever their lengths; the mapping's default is below both.
PRIO_DENY = 300
PRIO_PERMIT = 200
PRIO_POLICY_DEFAULT = 100
# AFFINITY priorities: a connection conntrack pinned to a serving backend, then the source-port buckets.
PRIO_PINNED = 300
PRIO_BUCKET = 200
# The conntrack zone of balanced mappings (ICMP's is rules.ICMP_ZONE = 1).
LB_ZONE = 2
LABEL_MASK = 0xFFFF_FFFF_FFFF  # ct_label's low 48 bits: the backend's MAC
TCP_ACK = 0x010
IPPROTO_TCP = 6
SRC_FIELD = {6: "tcp_src", 17: "udp_src"}
TO_L2 = Resubmit(Table.L2)


def mac_int(mac: str) -> int:
    """A MAC as the integer ct_label holds in its low 48 bits."""
    return int(mac.replace(":", ""), 16)


def is_plain(mapping: Mapping) -> bool:
    """A mapping that compiles exactly as before issue 15: one backend, no policy, serving."""
    return not mapping.balanced and not mapping.filtered and not mapping.down


@dataclass(frozen=True)
class Present:
    """A backend of the mapping that exists in the state: its container and its port on this switch."""

    container: Container
    weight: int
    serving: bool
    port: int | None


def mapping_flows(mapping: Mapping, backends: Sequence[Present]) -> Iterator[Flow]:
    """Every flow of a non-plain mapping on one switch. ``backends`` are the mapping's backends that
    exist, in order. With none serving, only the backends' source-port allowances remain: the
    mapping is then refused like an unmapped port (the public IP's reject flow answers)."""
    key = mapping.key
    name = str(key)
    k = OwnerKind.MAPPING
    proto = IPPROTO[key.proto]
    match: dict[str, int | str] = {"eth_type": ETH_IP, "ip_proto": proto, "ipv4_dst": str(key.public_ip),
                                   DST_FIELD[key.proto]: key.port}
    for b in backends:
        if b.port is not None:
            yield allowance_flow(mapping, b.container, b.port)
    serving = [b for b in backends if b.serving]
    if not serving:
        return
    cont: tuple[Action, ...]
    goto: Table | None
    if mapping.balanced:
        # OpenFlow's goto only goes forward (POLICY and BALANCE come after L2): AFFINITY resubmits to L2.
        yield from affinity_flows(mapping, serving, match)
        cont, goto = (), Table.BALANCE
        yield flow(Table.BALANCE, PRIO_SERVICE, k, name, (Ct(LB_ZONE, Table.AFFINITY),), None, **match)
    else:
        rewrite = SetField("eth_dst", serving[0].container.mac)
        if not mapping.filtered:
            yield flow(Table.MAPPING, PRIO_SERVICE, k, name, (rewrite,), Table.L2, **match)
            return
        cont, goto = (rewrite, TO_L2), None
    if not mapping.filtered:
        yield flow(Table.MAPPING, PRIO_SERVICE, k, name, cont, goto, **match)
        return
    yield flow(Table.MAPPING, PRIO_SERVICE, k, name, (), Table.POLICY, **match)
    for net in mapping.deny:
        yield flow(Table.POLICY, PRIO_DENY, k, name, (), None, ipv4_src=(str(net.network_address), str(net.netmask)),
                   **match)
    for net in mapping.allow:
        yield flow(Table.POLICY, PRIO_PERMIT, k, name, cont, goto,
                   ipv4_src=(str(net.network_address), str(net.netmask)), **match)
    if mapping.allow:
        yield flow(Table.POLICY, PRIO_POLICY_DEFAULT, k, name, (), None, **match)
    else:
        yield flow(Table.POLICY, PRIO_POLICY_DEFAULT, k, name, cont, goto, **match)


def affinity_flows(mapping: Mapping, serving: Sequence[Present], match: dict[str, int | str]) -> Iterator[Flow]:
    """AFFINITY's flows of a balanced mapping: one pinned flow per serving backend, 256 bucket flows.

    A TCP segment without ACK is a SYN, the first of a new connection: it never follows a pin but is
    balanced afresh (and committed again), so a client port reused right after a refused attempt is not
    held to that attempt's backend, even one that has since gone down.
    """
    name, k = str(mapping.key), OwnerKind.MAPPING
    proto = int(match["ip_proto"])
    tracked = {"ct_state": (CT_TRK, CT_TRK)}
    acked = {"tcp_flags": (TCP_ACK, TCP_ACK)} if proto == IPPROTO_TCP else {}
    macs = {b.container.name: b.container.mac for b in serving}
    for mac in dict.fromkeys(macs.values()):
        yield flow(Table.AFFINITY, PRIO_PINNED, k, name, (SetField("eth_dst", mac), TO_L2), None,
                   ct_label=(mac_int(mac), LABEL_MASK), **tracked, **acked, **match)
    table = bucket_table(slots([(b.container.name, b.weight) for b in serving]))
    src = SRC_FIELD[proto]
    for bucket, backend in enumerate(table):
        commit = Ct(LB_ZONE, commit=True, label_from="eth_dst")
        yield flow(Table.AFFINITY, PRIO_BUCKET, k, name, (SetField("eth_dst", macs[backend]), commit, TO_L2), None,
                   **{src: (bucket << BUCKET_SHIFT, BUCKET_MASK)}, **tracked, **match)


def counted_flows(flows: Sequence[Flow]) -> tuple[set[int], set[int]]:
    """Cookies of a mapping's flows whose counters are its allowed and its denied packets: with a
    policy, POLICY's continuing and dropping flows; else (balanced) its BALANCE flows, all allowed.
    Each packet of the mapping passes exactly one of them on the switch where it entered."""
    allowed: set[int] = set()
    denied: set[int] = set()
    policy = [f for f in flows if f.table is Table.POLICY]
    for f in policy or [f for f in flows if f.table is Table.BALANCE]:
        (allowed if f.actions or f.goto is not None else denied).add(f.cookie)
    return allowed, denied


__all__ = ["LABEL_MASK", "LB_ZONE", "MAX_SLOTS", "N_BUCKETS", "Present", "affinity_flows", "counted_flows", "is_plain",
           "mac_int", "mapping_flows", "slots"]
