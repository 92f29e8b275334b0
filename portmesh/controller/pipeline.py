"""The OpenFlow pipeline, declared once as data.

Every table the controller programs is listed here with its number, the match
fields its flows may use and the tables they may jump to. The compiler builds
flows against these declarations and :meth:`Table.check` rejects a flow that
steps outside them; ``docs/pipeline.md`` is generated from this module
(``python -m portmesh.controller.pipeline``) and a test keeps the two equal.
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class TableSpec:
    """What one table is for and what its flows may do."""

    number: int
    purpose: str
    match_fields: frozenset[str]
    next_tables: tuple[str, ...]
    miss: str


class Table(enum.Enum):
    """The pipeline's tables, in packet order. Names are the ones the code uses."""

    CLASSIFY = TableSpec(
        number=0,
        purpose=(
            "Ingress classification and port security. A container port may send only with its own MAC, "
            "from one of its IPs, and (TCP/UDP) from a source port it owns: a mapped service port or its "
            "ephemeral block. ARP must carry its own MAC and IP. The host's gateway port is trusted; IPv4 "
            "arriving on a tunnel port (a port named after another host's tunnel, see FROM_TUNNEL) goes to "
            "FROM_TUNNEL, anything else from a tunnel is dropped. Everything else hits the container's drop flow, "
            "whose counter is the port-security count. "
            "ICMP from a container: an echo request is committed to conntrack (zone 1, the sender's MAC in "
            "ct_label); a destination unreachable or time exceeded goes to the controller (meter ICMP_OUT), which "
            "passes it on to MAPPING only if the header it quotes is addressed to a port the sender owns; any "
            "other type is dropped. ICMP echo replies, destination unreachable and time exceeded from the gateway "
            "port are looked up in conntrack zone 1 and continue in MAPPING. Only ICMP meets conntrack; TCP and "
            "UDP never do. "
            "The uplink port (a gateway host whose agent runs with --uplink IFACE, reported in the Host row): "
            "IPv4 to a public pool goes to MAPPING, so inbound traffic never crosses the host's routing and the "
            "bridge's internal port (the agent's nftables ingress chain on IFACE drops the kernel's copy of "
            "exactly these frames); ICMP echo replies and errors to a pool are looked up in conntrack zone 1 "
            "first, as from the gateway port; ARP asking for a pool address goes to ARP (an upstream that "
            "treats the pools as on-link gets the virtual MAC). Everything else from the uplink is dropped "
            "here and counted: the host's kernel has its own copy (ARP for the host's address, the host's own "
            "traffic). Nothing is ever output to the uplink but answers out of IN_PORT (ARP, echo replies, the "
            "controller's refusals): outbound traffic leaves through LOCAL and the host's routing, and "
            "ovs-vswitchd's packet socket does not read back the frames the kernel sends on the uplink."
        ),
        match_fields=frozenset(
            {"in_port", "eth_src", "eth_type", "ipv4_src", "ipv4_dst", "ip_proto", "tcp_src", "udp_src", "arp_spa",
             "arp_sha", "arp_tpa", "icmpv4_type"}
        ),
        next_tables=("ARP", "MAPPING", "FROM_TUNNEL"),
        miss="drop",
    )
    ARP = TableSpec(
        number=1,
        purpose=(
            "ARP responder. Requests for a public IP are answered with the virtual MAC, requests for the "
            "gateway with the gateway MAC, by rewriting the request into a reply and sending it back out of "
            "IN_PORT. No ARP ever reaches a container, so containers sharing an IP never answer for each other."
        ),
        match_fields=frozenset({"eth_type", "arp_op", "arp_tpa"}),
        next_tables=(),
        miss="drop",
    )
    MAPPING = TableSpec(
        number=2,
        purpose=(
            "The mapping table: (ipv4_dst, ip_proto, tp_dst) -> set eth_dst to the owning container's MAC. "
            "Exact flows for service ports, one masked flow per ephemeral block. ICMP echo requests to a "
            "public IP or to the gateway are answered here. An unmapped TCP/UDP destination on a public IP goes "
            "to the controller, which answers with a TCP reset or ICMP port unreachable. The fence: anything "
            "else to 169.254.0.0/16 or to a protected (management, underlay) network is dropped, whoever sends "
            "it. ICMP that conntrack relates to a container's echo (the reply, or an error quoting the request) "
            "gets eth_dst from the ct_label its request set (two sharers pinging one destination with the same "
            "echo id share one entry: the later sender gets both replies). A destination unreachable or time exceeded to a "
            "public IP goes to the controller (meter ICMP_IN), which finds the owner of the address and port the "
            "error quotes (mappings, then port blocks) and sends it on to L2 with eth_dst set to the owner's MAC. "
            "Other destinations pass to L2. A mapping with a firewall policy goes to POLICY instead of being "
            "rewritten here; a balanced one (several backends) goes to BALANCE. Plain mappings (one backend, no policy) are "
            "rewritten here as before and never pass POLICY, BALANCE or AFFINITY."
        ),
        match_fields=frozenset({"eth_type", "ipv4_dst", "ip_proto", "tcp_dst", "udp_dst", "icmpv4_type", "ct_state"}),
        next_tables=("L2", "POLICY", "BALANCE"),
        miss="goto L2",
    )
    L2 = TableSpec(
        number=3,
        purpose=(
            "L2 forwarding keyed by (switch, eth_dst): a container MAC goes to its port (IN_PORT when the "
            "packet came from that very port), the gateway MAC to the host's LOCAL port. Programmed "
            "proactively from desired state; nothing is learned. What reaches LOCAL from a container is thus "
            "IPv4 to a destination outside the public pools, link-local and protected networks; the host "
            "firewall on br0 (table inet portmesh, applied by the agent) then lets it be forwarded to the "
            "outside but never delivered to a socket of the host, whatever host address it is sent to. The "
            "host kernel never sees a container port's frames directly: each container port has an nftables "
            "netdev ingress chain with policy drop (table netdev portmesh), which OVS's packet socket precedes."
        ),
        match_fields=frozenset({"eth_dst", "in_port"}),
        next_tables=(),
        miss="drop",
    )
    FROM_TUNNEL = TableSpec(
        number=4,
        purpose=(
            "Frames that came from another host through a VXLAN tunnel port. They were classified, rewritten "
            "and fenced on the switch where they entered the cloud, so here they are only delivered, and only "
            "to local things (split horizon: a frame from a tunnel never leaves by a tunnel, so it crosses at "
            "most one): a local container's MAC goes to its port; on a host that is a gateway, the gateway MAC "
            "goes to LOCAL (ICMP echo requests first committed to conntrack zone 1 with the sender's MAC in "
            "ct_label, as from a container port, so the reply finds its way back through L2 and the tunnel). "
            "On other hosts L2 sends a remote container's MAC to the tunnel port of its host and the gateway MAC "
            "to the tunnel port of the host's gateway host, so that traffic between containers of one host never "
            "leaves it and traffic to another host crosses exactly one tunnel."
        ),
        match_fields=frozenset({"eth_dst", "eth_type", "ip_proto", "icmpv4_type"}),
        next_tables=(),
        miss="drop",
    )
    POLICY = TableSpec(
        number=5,
        purpose=(
            "A filtered mapping's firewall, keyed by (ipv4_dst, ip_proto, tp_dst) and the source network: deny "
            "networks drop (highest priority, so a deny inside an allow wins), allow networks continue, and the "
            "mapping's default continues if it has no allow list, else drops. Continuing is what the mapping "
            "would do in MAPPING (rewrite eth_dst and go to L2, or go to BALANCE). A denied "
            "TCP SYN gets no answer: a reset would confirm to a scanner that the port is served and would let "
            "spoofed sources aim resets at third parties; an unmapped port still answers with a reset. The "
            "flows' packet and byte counters are the mapping's allowed/denied counters."
        ),
        match_fields=frozenset({"eth_type", "ipv4_dst", "ipv4_src", "ip_proto", "tcp_dst", "udp_dst"}),
        next_tables=("L2", "BALANCE"),
        miss="drop",
    )
    BALANCE = TableSpec(
        number=6,
        purpose=(
            "Entry of a balanced mapping (direct server return: only eth_dst changes): one flow per mapping, "
            "keyed by (ipv4_dst, ip_proto, tp_dst), sends the packet through conntrack zone 2 (balanced mappings "
            "only; ICMP has zone 1) and resumes it in AFFINITY. Without a policy its counters are the mapping's "
            "allowed counters."
        ),
        match_fields=frozenset({"eth_type", "ipv4_dst", "ip_proto", "tcp_dst", "udp_dst"}),
        next_tables=("AFFINITY",),
        miss="drop",
    )
    AFFINITY = TableSpec(
        number=7,
        purpose=(
            "Backend choice of balanced mappings; the connection table is conntrack zone 2, whose ct_label holds "
            "each connection's backend MAC in its low 48 bits. Pinned flows (one per serving backend: the "
            "mapping's (ipv4_dst, ip_proto, tp_dst), ct_state +trk, ct_label = the MAC, and for TCP only segments "
            "with ACK) set eth_dst to that MAC and go to L2 (resubmit: OpenFlow's goto only goes forward). "
            "Everything else of the mapping (a TCP SYN, which is always balanced afresh, so a client port reused "
            "right after a refused attempt is not held to it; a new UDP flow; a connection whose backend stopped "
            "serving or was removed, whose pinned flow is gone) falls to 256 bucket flows keyed by bits 1-8 of "
            "the source port (mask 0x1fe; Linux's connect() prefers even ports, so bit 0 says little), each "
            "filled Maglev-style from the serving backends' weight-expanded slots (portmesh/model/buckets.py: "
            "even by weight, few buckets move when a backend comes or goes): it commits the connection with the "
            "chosen MAC in ct_label, sets eth_dst and goes to L2. Packets conntrack flags +inv are not dropped: "
            "the switch sees only the client's half of a connection, and OVS's userspace conntrack fails its "
            "sequence check on many of them, but they carry their entry's label all the same. A pin lives as "
            "long as its conntrack entry: zone 2 has OVS's default timeouts (the server's half is never seen, so a "
            "TCP entry expires 30 s after its last packet, a FIN included; UDP 60 s), so a connection "
            "quiet for longer is re-chosen from its bucket, the same backend while the serving set is unchanged. "
            "Controller-programmed (the mapping owns every flow, so deleting it deletes them); nothing is learned."
        ),
        match_fields=frozenset({"eth_type", "ipv4_dst", "ip_proto", "tcp_src", "tcp_dst", "udp_src", "udp_dst",
                                "ct_state", "ct_label", "tcp_flags"}),
        next_tables=("L2",),
        miss="drop",
    )

    def __repr__(self) -> str:
        return f"Table.{self.name}"

    @property
    def number(self) -> int:
        return self.value.number

    def check(self, match: dict[str, object], goto: Table | None) -> None:
        """Raise ``ValueError`` if a flow uses a field or a jump this table does not declare."""
        unknown = set(match) - self.value.match_fields
        if unknown:
            raise ValueError(f"table {self.name} does not match on {sorted(unknown)}")
        if goto is not None and goto.name not in self.value.next_tables:
            raise ValueError(f"table {self.name} may not go to {goto.name}")


@dataclass(frozen=True)
class MeterSpec:
    """An OpenFlow meter the controller keeps on every switch: packets per second, with a burst."""

    meter_id: int
    rate_pps: int
    burst: int
    purpose: str


class Meter(enum.Enum):
    """Rate limits on what flows send to the controller. Meter-mods cannot ride in a bundle, so the
    controller sets these (add, or modify when they exist) before it sends a switch its first flows."""

    ICMP_IN = MeterSpec(
        meter_id=1, rate_pps=200, burst=100,
        purpose="ICMP errors arriving for a public IP, on their way to the controller to find the owner.",
    )
    ICMP_OUT = MeterSpec(
        meter_id=2, rate_pps=100, burst=50,
        purpose="ICMP errors sent by containers, on their way to the controller to be checked.",
    )

    @property
    def meter_id(self) -> int:
        return self.value.meter_id


def render_markdown() -> str:
    """The pipeline document, generated from the declarations above."""
    lines = [
        "# portmesh OpenFlow pipeline",
        "",
        "Generated from `portmesh/controller/pipeline.py` by `python -m portmesh.controller.pipeline`;",
        "a test fails when this file and the module disagree. OpenFlow 1.3, one bridge per host,",
        "`fail_mode=secure`, every flow installed proactively with a cookie naming its owner.",
        "",
    ]
    for table in Table:
        spec = table.value
        lines += [
            f"## Table {spec.number}: `{table.name}`",
            "",
            spec.purpose,
            "",
            f"- match fields: {', '.join(f'`{f}`' for f in sorted(spec.match_fields))}",
            f"- goes to: {', '.join(f'`{t}`' for t in spec.next_tables) or 'nothing (terminal)'}",
            f"- on a miss: {spec.miss}",
            "",
        ]
    lines += ["## Meters", "", "Per switch; beyond the rate (plus the burst) packets are dropped before the controller.", ""]
    for meter in Meter:
        m = meter.value
        lines.append(f"- `{meter.name}` (meter {m.meter_id}): {m.rate_pps} packets/s, burst {m.burst}. {m.purpose}")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
