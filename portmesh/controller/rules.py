"""The flows each owner needs (host, tunnel ports, public IP, container, mapping): pure builders.

:mod:`portmesh.controller.compiler` decides which owners a switch has and caches
their flows; this module says what those flows are, table by table, against the
declarations in :mod:`portmesh.controller.pipeline`. No I/O, no state.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache, lru_cache
from ipaddress import IPv4Address, IPv4Network

from portmesh.controller.flows import (
    OFPP_IN_PORT,
    OFPP_LOCAL,
    Ct,
    Flow,
    Move,
    Output,
    OwnerKind,
    SetField,
    Shape,
    ToController,
    flow,
    owner_id,
    shape_of,
)
from portmesh.controller.pipeline import Meter, Table
from portmesh.model.config import NetworkConfig
from portmesh.model.entities import Container, Mapping, Proto

ETH_IP = 0x0800
ETH_ARP = 0x0806
IPPROTO = {Proto.TCP: 6, Proto.UDP: 17}
IPPROTO_ICMP = 1
ICMP_ECHO_REPLY, ICMP_DEST_UNREACH, ICMP_ECHO_REQUEST, ICMP_TIME_EXCEEDED = 0, 3, 8, 11
ICMP_ERRORS = (ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED)
# Conntrack zone of containers' echo requests; nothing else is tracked (TCP/UDP never are).
ICMP_ZONE = 1
CT_EST, CT_REL, CT_RPL, CT_TRK = 0x02, 0x04, 0x08, 0x20
# The whole packet: an ICMP error is forwarded as it came, and its checksum covers all of it.
WHOLE_PACKET = 0xFFFF
SRC_FIELD = {Proto.TCP: "tcp_src", Proto.UDP: "udp_src"}
DST_FIELD = {Proto.TCP: "tcp_dst", Proto.UDP: "udp_dst"}

# Priorities, highest first; named so the pipeline reads the same in code and in dumps.
PRIO_ICMP_CT = 400
PRIO_ICMP_LOCAL = 150
PRIO_SERVICE = 300
PRIO_BLOCK = 200
PRIO_ALLOW = 100
PRIO_REJECT = 50
PRIO_FENCE = 40
PRIO_PORT_DROP = 10
PRIO_DEFAULT = 0

LINK_LOCAL = IPv4Network("169.254.0.0/16")


def tunnel_delivery_flow(container: Container, tunnel: int) -> Flow:
    """On another host's switch: the container's MAC goes into the tunnel to its host."""
    return flow(Table.L2, PRIO_ALLOW, OwnerKind.CONTAINER, container.name, (Output(tunnel),), eth_dst=container.mac)


def tunnel_flows(config: NetworkConfig, host: str, tunnel_ports: tuple[int, ...], is_gateway: bool) -> Iterator[Flow]:
    """Frames from other hosts: IPv4 from a tunnel port goes to FROM_TUNNEL, which delivers only locally.

    Split horizon: nothing in FROM_TUNNEL outputs to a tunnel, so a frame crosses at
    most one. On a gateway host the gateway MAC leads to the host (the way out for
    compute hosts' containers); an echo request is committed to conntrack first, as
    from a container port, so the reply (which comes back through LOCAL) gets its
    owner's MAC from ct_label and L2 sends it into the tunnel to the owner's host.
    """
    h = OwnerKind.HOST
    for port in tunnel_ports:
        yield flow(Table.CLASSIFY, PRIO_ALLOW, h, host, (), Table.FROM_TUNNEL, in_port=port, eth_type=ETH_IP)
    if is_gateway and tunnel_ports:
        yield flow(Table.FROM_TUNNEL, PRIO_ICMP_LOCAL, h, host,
                   (Ct(ICMP_ZONE, commit=True, label_from="eth_src"), Output(OFPP_LOCAL)),
                   eth_dst=config.gateway_mac, eth_type=ETH_IP, ip_proto=IPPROTO_ICMP, icmpv4_type=ICMP_ECHO_REQUEST)
        yield flow(Table.FROM_TUNNEL, PRIO_ALLOW, h, host, (Output(OFPP_LOCAL),), eth_dst=config.gateway_mac)
    yield flow(Table.FROM_TUNNEL, PRIO_DEFAULT, h, host)


def host_flows(config: NetworkConfig, host: str, gateway_out: int | None = OFPP_LOCAL) -> Iterator[Flow]:
    """Flows every switch has: trust the gateway port, answer ARP for the gateway, default paths.

    ``gateway_out`` is where frames for the gateway MAC go: LOCAL on a host that is its own
    way out, else the tunnel port to its gateway host (None while that port is missing: dropped).
    """
    h = OwnerKind.HOST
    yield flow(Table.CLASSIFY, PRIO_ALLOW, h, host, (), Table.ARP, in_port=OFPP_LOCAL, eth_type=ETH_ARP)
    yield flow(Table.CLASSIFY, PRIO_ALLOW, h, host, (), Table.MAPPING, in_port=OFPP_LOCAL, eth_type=ETH_IP)
    yield flow(Table.CLASSIFY, PRIO_DEFAULT, h, host)
    yield flow(Table.ARP, PRIO_ALLOW, h, host, arp_responder(config.gateway_ip, config.gateway_mac),
               eth_type=ETH_ARP, arp_op=1, arp_tpa=str(config.gateway_ip))
    yield flow(Table.ARP, PRIO_DEFAULT, h, host)
    yield flow(Table.MAPPING, PRIO_ALLOW, h, host, icmp_echo_responder(config.gateway_ip, config.gateway_mac),
               eth_type=ETH_IP, ipv4_dst=str(config.gateway_ip), ip_proto=IPPROTO_ICMP, icmpv4_type=8)
    yield from fence_flows(config, host)
    yield flow(Table.MAPPING, PRIO_DEFAULT, h, host, (), Table.L2)
    if gateway_out is not None:
        yield flow(Table.L2, PRIO_ALLOW, h, host, (Output(gateway_out),), eth_dst=config.gateway_mac)
    yield flow(Table.L2, PRIO_DEFAULT, h, host)
    yield from icmp_host_flows(host)


def uplink_flows(config: NetworkConfig, host: str, port: int) -> Iterator[Flow]:
    """The gateway host's uplink as a switch port: inbound traffic to the pools enters the pipeline here.

    The agent (``--uplink IFACE``) made IFACE a br0 port and drops the host kernel's copy
    of IPv4 to the pools at IFACE's ingress, so these frames are handled once, by the
    switch, before any routing. They arrive with eth_dst = the uplink's MAC (the upstream
    routes the pools to the host's address) or the virtual MAC (ARP answered here); the
    mapping rewrites eth_dst only, and eth_src stays the upstream's: a container never
    reads it, and the controller's refusals and the echo answers go back out of IN_PORT to
    that very address. Everything else the uplink brings is the kernel's (it has its own
    copy): dropped here, counted by the port's drop flow.
    """
    h = OwnerKind.HOST
    for pool in config.public_pools:
        net = (str(pool.network_address), str(pool.netmask))
        for icmp_type in (ICMP_ECHO_REPLY, *ICMP_ERRORS):
            yield flow(Table.CLASSIFY, PRIO_ICMP_LOCAL, h, host, (Ct(ICMP_ZONE, Table.MAPPING),), in_port=port,
                       eth_type=ETH_IP, ipv4_dst=net, ip_proto=IPPROTO_ICMP, icmpv4_type=icmp_type)
        yield flow(Table.CLASSIFY, PRIO_ALLOW, h, host, (), Table.MAPPING, in_port=port, eth_type=ETH_IP, ipv4_dst=net)
        yield flow(Table.CLASSIFY, PRIO_ALLOW, h, host, (), Table.ARP, in_port=port, eth_type=ETH_ARP, arp_tpa=net)
    yield flow(Table.CLASSIFY, PRIO_PORT_DROP, h, host, in_port=port)


def icmp_host_flows(host: str) -> Iterator[Flow]:
    """ICMP that concerns a container's echo, found through conntrack; nothing else is tracked.

    A container's echo request is committed with its MAC in ct_label (see
    :func:`container_port_flows`). Echo replies and errors from the gateway port
    are looked up; the reply to, or an error about, such a request takes its
    eth_dst from the label. Two containers sharing an IP that ping the same
    destination with the same echo id share one conntrack entry: the later one
    gets both replies.
    """
    h = OwnerKind.HOST
    for icmp_type in (ICMP_ECHO_REPLY, *ICMP_ERRORS):
        yield flow(Table.CLASSIFY, PRIO_ICMP_LOCAL, h, host, (Ct(ICMP_ZONE, Table.MAPPING),),
                   in_port=OFPP_LOCAL, eth_type=ETH_IP, ip_proto=IPPROTO_ICMP, icmpv4_type=icmp_type)
    to_owner = (Move("ct_label", "eth_dst", 48),)
    reply = CT_TRK | CT_EST | CT_RPL
    yield flow(Table.MAPPING, PRIO_ICMP_CT, h, host, to_owner, Table.L2,
               ct_state=(reply, reply), eth_type=ETH_IP, ip_proto=IPPROTO_ICMP, icmpv4_type=ICMP_ECHO_REPLY)
    yield flow(Table.MAPPING, PRIO_ICMP_CT, h, host, to_owner, Table.L2,
               ct_state=(CT_TRK | CT_REL, CT_TRK | CT_REL), eth_type=ETH_IP, ip_proto=IPPROTO_ICMP)


def fence_flows(config: NetworkConfig, host: str) -> Iterator[Flow]:
    """Nothing goes through the switch to link-local, management or underlay addresses.

    The gateway MAC leads to the host (LOCAL), which would route anything; these
    drops keep 169.254.0.0/16 (but the switch's own answers for the gateway) and
    the protected networks out of reach whoever sends. The host firewall
    (portmesh/agent/isolation.py) guards the host's own addresses, which the
    controller does not know.
    """
    for net in sorted({LINK_LOCAL, *config.protected_networks}):
        yield flow(Table.MAPPING, PRIO_FENCE, OwnerKind.HOST, host,
                   eth_type=ETH_IP, ipv4_dst=(str(net.network_address), str(net.netmask)))


def public_ip_flows(config: NetworkConfig, ip: IPv4Address) -> Iterator[Flow]:
    """Per public IP: ARP and ICMP echo answered by the switch; unmapped TCP/UDP rejected; ICMP errors
    to the controller, which delivers each to the owner of the port it quotes (portmesh/controller/icmp.py)."""
    name = str(ip)
    k = OwnerKind.REJECT
    yield flow(Table.ARP, PRIO_ALLOW, k, name, arp_responder(ip, config.virtual_mac),
               eth_type=ETH_ARP, arp_op=1, arp_tpa=name)
    yield flow(Table.MAPPING, PRIO_ALLOW, k, name, icmp_echo_responder(ip, config.virtual_mac),
               eth_type=ETH_IP, ipv4_dst=name, ip_proto=IPPROTO_ICMP, icmpv4_type=8)
    for proto in Proto:
        yield flow(Table.MAPPING, PRIO_REJECT, k, name, (ToController(),),
                   eth_type=ETH_IP, ipv4_dst=name, ip_proto=IPPROTO[proto])
    for icmp_type in ICMP_ERRORS:
        yield flow(Table.MAPPING, PRIO_ALLOW, k, name, (ToController(WHOLE_PACKET, Meter.ICMP_IN),),
                   eth_type=ETH_IP, ipv4_dst=name, ip_proto=IPPROTO_ICMP, icmpv4_type=icmp_type)


@cache
def _mapping_shapes(proto: Proto) -> tuple[Shape, Shape]:
    """The two shapes every mapping of ``proto`` uses: built once, so a mapping costs two tuples and two digests."""
    dst, src = DST_FIELD[proto], SRC_FIELD[proto]
    rewrite = shape_of(Table.MAPPING, PRIO_SERVICE, ("eth_type", "ip_proto", "ipv4_dst", dst),
                       actions=((SetField, "eth_dst"),), goto=Table.L2)
    allow = shape_of(Table.CLASSIFY, PRIO_ALLOW, ("eth_src", "eth_type", "in_port", "ip_proto", "ipv4_src", src),
                     goto=Table.MAPPING)
    return rewrite, allow


@lru_cache(maxsize=1 << 16)
def _text(ip: IPv4Address) -> str:
    """An address's text: thousands of mappings share one public IP, so format each once."""
    return str(ip)


def mapping_flows(mapping: Mapping, owner: Container, port: int | None) -> Iterator[Flow]:
    """The mapping's rewrite flow (every switch) and, on the owner's switch, its source-port allowance.

    The hot path of a 100,000-mapping compile: the same flows as :func:`flow` would
    build (a unit test compares them), from pre-built shapes. Field order is the
    shapes' sorted order.
    """
    rewrite = rewrite_flow(mapping, owner.mac)
    yield rewrite
    if port is not None:
        yield allowance_flow(mapping, owner, port, rewrite)


def rewrite_flow(mapping: Mapping, mac: str) -> Flow:
    """The mapping's rewrite: (public IP, proto, port) -> eth_dst of its owner. The same on every switch."""
    key = mapping.key
    name = str(key)
    k = OwnerKind.MAPPING
    rewrite, _allow = _mapping_shapes(key.proto)
    return Flow(rewrite, (ETH_IP, IPPROTO[key.proto], _text(key.public_ip), key.port, mac), k, name,
                owner_id(k, name) << 32)


def allowance_flow(mapping: Mapping, owner: Container, port: int, rewrite: Flow | None = None) -> Flow:
    """On the owner's switch: the owner may send from the mapped port. Given the mapping's
    ``rewrite`` flow, its owner name and cookie bits are reused (the same owner: no second digest)."""
    key = mapping.key
    k = OwnerKind.MAPPING
    _rewrite, allow = _mapping_shapes(key.proto)
    values = (owner.mac, ETH_IP, port, IPPROTO[key.proto], _text(key.public_ip), key.port)
    if rewrite is not None:
        return Flow(allow, values, k, rewrite.owner, rewrite.cookie & ~0xFFFFFFFF)
    name = str(key)
    return Flow(allow, values, k, name, owner_id(k, name) << 32)


def block_flows(container: Container) -> Iterator[Flow]:
    """Replies to the container's own connections: one masked flow per IP and protocol."""
    block = container.block
    for ip in container.ips:
        for proto in Proto:
            yield flow(Table.MAPPING, PRIO_BLOCK, OwnerKind.CONTAINER, container.name,
                       (SetField("eth_dst", container.mac),), Table.L2,
                       eth_type=ETH_IP, ipv4_dst=str(ip), ip_proto=IPPROTO[proto],
                       **{DST_FIELD[proto]: (block.start, block.mask)})


def container_port_flows(container: Container, port: int) -> Iterator[Flow]:
    """Port security and L2 delivery for a container on this switch."""
    k = OwnerKind.CONTAINER
    name = container.name
    mac = container.mac
    for ip in container.ips:
        yield flow(Table.CLASSIFY, PRIO_ALLOW, k, name, (), Table.ARP,
                   in_port=port, eth_src=mac, eth_type=ETH_ARP, arp_spa=str(ip), arp_sha=mac)
        # ICMP: echo requests are tracked (their replies come back by conntrack); errors are checked by
        # the controller (they must quote a port of the sender's); other types are dropped.
        yield flow(Table.CLASSIFY, PRIO_ALLOW, k, name, (Ct(ICMP_ZONE, commit=True, label_from="eth_src"),),
                   Table.MAPPING, in_port=port, eth_src=mac, eth_type=ETH_IP, ipv4_src=str(ip),
                   ip_proto=IPPROTO_ICMP, icmpv4_type=ICMP_ECHO_REQUEST)
        for icmp_type in ICMP_ERRORS:
            yield flow(Table.CLASSIFY, PRIO_ALLOW, k, name, (ToController(WHOLE_PACKET, Meter.ICMP_OUT),),
                       in_port=port, eth_src=mac, eth_type=ETH_IP, ipv4_src=str(ip),
                       ip_proto=IPPROTO_ICMP, icmpv4_type=icmp_type)
        for proto in Proto:
            yield flow(Table.CLASSIFY, PRIO_ALLOW, k, name, (), Table.MAPPING,
                       in_port=port, eth_src=mac, eth_type=ETH_IP, ipv4_src=str(ip), ip_proto=IPPROTO[proto],
                       **{SRC_FIELD[proto]: (container.block.start, container.block.mask)})
    yield flow(Table.CLASSIFY, PRIO_PORT_DROP, k, name, in_port=port)
    yield flow(Table.L2, PRIO_BLOCK, k, name, (Output(OFPP_IN_PORT),), eth_dst=mac, in_port=port)
    yield flow(Table.L2, PRIO_ALLOW, k, name, (Output(port),), eth_dst=mac)
    yield flow(Table.FROM_TUNNEL, PRIO_ALLOW, k, name, (Output(port),), eth_dst=mac)


def arp_responder(ip: IPv4Address, mac: str) -> tuple[SetField | Move | Output, ...]:
    """Turn an ARP request for ``ip`` into the reply ``ip is-at mac`` and send it back (as OVN does)."""
    return (
        Move("eth_src", "eth_dst", 48),
        SetField("eth_src", mac),
        SetField("arp_op", 2),
        Move("arp_sha", "arp_tha", 48),
        SetField("arp_sha", mac),
        Move("arp_spa", "arp_tpa", 32),
        SetField("arp_spa", str(ip)),
        Output(OFPP_IN_PORT),
    )


def icmp_echo_responder(ip: IPv4Address, mac: str) -> tuple[SetField | Move | Output, ...]:
    """Turn an ICMP echo request to ``ip`` into its reply (OVS fixes the checksums)."""
    return (
        Move("eth_src", "eth_dst", 48),
        SetField("eth_src", mac),
        Move("ipv4_src", "ipv4_dst", 32),
        SetField("ipv4_src", str(ip)),
        SetField("icmpv4_type", 0),
        Output(OFPP_IN_PORT),
    )
