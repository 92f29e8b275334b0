"""Flows of mappings that are more than a rewrite: a firewall policy (POLICY) and/or several backends
(BALANCE + AFFINITY). Pure builders, like :mod:`portmesh.controller.rules`.

A plain mapping (one backend, no policy, serving) never comes here and compiles exactly as before
(pinned cookies). For the others every flow belongs to the mapping (owner ``str(key)``), so removing
or changing the mapping removes precisely its flows, as for a plain one.

Connection affinity without NAT: the switch itself learns each new connection of a balanced mapping
into AFFINITY (OVS ``learn``), so every later packet of it is sent to the same backend whatever
happens to the backend set; new connections are spread by ``multipath`` (HRW) over the serving
backends' weight-expanded slots. Conntrack marks were the alternative; with direct server return the
switch sees only the client's half of each connection, so conntrack would track one direction and
never see it established (OVS's userspace conntrack keeps such entries in SYN_SENT with its short
timeout), and every balanced packet would pay a recirculation; a learned flow is an ordinary
exact-match flow whose timeouts OVS refreshes from its own datapath statistics.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from portmesh.controller.flows import Action, Flow, Learn, Multipath, OwnerKind, Resubmit, SetField, flow
from portmesh.controller.pipeline import Table
from portmesh.controller.rules import (
    DST_FIELD,
    ETH_IP,
    IPPROTO,
    PRIO_SERVICE,
    allowance_flow,
)
from portmesh.model.entities import Container, Mapping
from portmesh.model.slots import MAX_SLOTS, slots

# POLICY priorities: a deny beats an allow whatever their lengths; the mapping's default is below both.
PRIO_DENY = 300
PRIO_PERMIT = 200
PRIO_POLICY_DEFAULT = 100
# BALANCE priorities: a connection AFFINITY knew, then the slot multipath chose.
PRIO_PINNED = 300
PRIO_SLOT = 200
# Learned AFFINITY flows: idle timeouts in seconds. The switch sees only the client's side (DSR), so
# the idle timeout must outlast a quiet client; after a FIN a connection's flow goes within seconds.
# Should a quiet connection's flow expire anyway, HRW sends it to the same backend while the set is
# unchanged.
AFFINITY_IDLE_S = {6: 300, 17: 60}
AFFINITY_FIN_IDLE_S = 5
PRIO_LEARNED = 100
TCP_ACK = 0x010
IPPROTO_TCP = 6
TO_L2 = Resubmit(Table.L2)


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
        # OpenFlow's goto only goes forward (POLICY and BALANCE come after L2): they resubmit to L2 instead.
        # A TCP segment without ACK is a SYN, the first of a new connection: it never follows a learned
        # flow but is balanced afresh (and re-learnt). A client reuses a source port at once after a
        # refusal (a reset leaves no TIME_WAIT), and the refused attempt's learned flow, which no FIN ever
        # ends, would otherwise send it to the same backend, even one that has since gone down.
        fresh = {"tcp_flags": (TCP_ACK, TCP_ACK)} if proto == IPPROTO_TCP else {}
        pinned = flow(Table.BALANCE, PRIO_PINNED, k, name, (TO_L2,), None, reg0=(1, 1), **fresh, **match)
        yield pinned
        chosen = slots([(b.container.name, b.weight) for b in serving])
        macs = {b.container.name: b.container.mac for b in serving}
        learn = Learn(Table.AFFINITY, proto, pinned.cookie, AFFINITY_IDLE_S[proto], AFFINITY_FIN_IDLE_S,
                      PRIO_LEARNED)
        for i, backend in enumerate(chosen):
            yield flow(Table.BALANCE, PRIO_SLOT, k, name, (SetField("eth_dst", macs[backend]), learn, TO_L2), None,
                       reg1=i, **match)
        cont, goto = (Resubmit(Table.AFFINITY), Multipath(len(chosen))), Table.BALANCE
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


__all__ = ["MAX_SLOTS", "Present", "counted_flows", "is_plain", "mapping_flows", "slots"]
