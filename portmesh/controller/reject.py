"""Answers for unmapped destinations: a TCP reset or an ICMP port unreachable.

The switch punts the first packet of a connection to an unmapped
``(public_ip, proto, port)`` (rate-limited by the switch); this module builds
the refusal with os-ken's packet library, as OVN's ``tcp_reset``/``icmp4``
actions do, so a client learns at once instead of timing out. Mapped traffic
never comes here: the pipeline is proactive.
"""

from __future__ import annotations

from os_ken.lib.packet import ethernet, icmp, ipv4, packet, tcp, udp


def refusal(frame: bytes, virtual_mac: str) -> bytes | None:
    """The frame to send back for ``frame``, or None if it deserves no answer.

    TCP gets RST (RFC 9293 §3.10.7.1: ACK the segment if it had no ACK, else
    take its ACK as our sequence number); UDP gets ICMP port unreachable
    quoting the offending IP header and 8 bytes. A RST is never answered.
    """
    pkt = packet.Packet(frame)
    eth = pkt.get_protocol(ethernet.ethernet)
    ip = pkt.get_protocol(ipv4.ipv4)
    if eth is None or ip is None:
        return None
    out = packet.Packet()
    out.add_protocol(ethernet.ethernet(dst=eth.src, src=virtual_mac, ethertype=eth.ethertype))
    seg = pkt.get_protocol(tcp.tcp)
    if seg is not None:
        if seg.bits & tcp.TCP_RST:
            return None
        out.add_protocol(ipv4.ipv4(src=ip.dst, dst=ip.src, proto=ip.proto, ttl=64))
        if seg.bits & tcp.TCP_ACK:
            out.add_protocol(tcp.tcp(src_port=seg.dst_port, dst_port=seg.src_port, seq=seg.ack, bits=tcp.TCP_RST))
        else:
            payload = pkt.protocols[-1] if isinstance(pkt.protocols[-1], bytes) else b""
            length = len(payload) + (1 if seg.bits & tcp.TCP_SYN else 0) + (1 if seg.bits & tcp.TCP_FIN else 0)
            out.add_protocol(
                tcp.tcp(
                    src_port=seg.dst_port,
                    dst_port=seg.src_port,
                    seq=0,
                    ack=(seg.seq + length) & 0xFFFFFFFF,
                    bits=tcp.TCP_RST | tcp.TCP_ACK,
                )
            )
        out.serialize()
        return bytes(out.data)
    if pkt.get_protocol(udp.udp) is not None:
        ip_start = 14
        quoted = frame[ip_start : ip_start + ip.header_length * 4 + 8]
        out.add_protocol(ipv4.ipv4(src=ip.dst, dst=ip.src, proto=1, ttl=64))
        out.add_protocol(icmp.icmp(type_=icmp.ICMP_DEST_UNREACH, code=icmp.ICMP_PORT_UNREACH_CODE,
                                   data=icmp.dest_unreach(data=quoted)))
        out.serialize()
        return bytes(out.data)
    return None
