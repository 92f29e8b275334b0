"""The frames the program builds or refuses, byte for byte (same lab as test_program.py).

A kernel between veths trusts a checksum it never computed (CHECKSUM_PARTIAL), so "connection
refused" alone does not prove a RST is well formed: here the answers are caught on inet's eth0
and their checksums, sequence numbers and quotes checked as a wire would see them.
"""

from __future__ import annotations

import json
import socket
import struct

from portmesh.agent.ebpf import layout

from .conftest import GATEWAY_MAC, INET, PUBLIC, PY, TOOLS, Dplab, csum, ipv4_frame, mac_raw, sh

D = layout.DropReason
TCP, UDP, ICMP = layout.IPPROTO_TCP, layout.IPPROTO_UDP, 1


def mac_of(ns: str, ifname: str) -> str:
    return str(json.loads(sh("ip", "-n", ns, "-j", "link", "show", ifname))[0]["address"])


def send_and_catch(lab: Dplab, frame: str, proto: int) -> bytes:
    """Send one frame from inet to the host's uplink; the first answer from PUBLIC with ``proto``."""
    catcher = lab.start(lab.inet, PY, "-m", "tests.ebpf.nstool", "catch", "eth0", str(PUBLIC), str(proto), "3",
                        ready="READY")
    lab.tool(lab.inet, "clients.py", "raw-send", "--ifname", "eth0", frame)
    out = lab.rest(catcher, timeout=10).strip()
    assert out, "no answer caught"
    return bytes.fromhex(out)


def tcp_segment(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes) -> bytes:
    head = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, TCP, len(head) + len(payload))
    check = csum(pseudo + head + payload)
    return head[:16] + struct.pack("!H", check) + head[18:] + payload


def check_ipv4(frame: bytes, proto: int, length: int) -> None:
    ip = frame[14:34]
    assert len(frame) == 14 + length, frame.hex()
    assert ip[0] == 0x45 and ip[9] == proto and struct.unpack("!H", ip[2:4])[0] == length
    assert csum(ip) == 0, "IP checksum"
    assert ip[12:16] == socket.inet_aton(str(PUBLIC)) and ip[16:20] == socket.inet_aton(INET)


def test_rst_is_what_a_kernel_sends(dplab: Dplab) -> None:
    up0, me = mac_of(dplab.host, "up0"), mac_of(dplab.inet, "eth0")
    cases = [  # (flags in, seq, ack, payload) -> (flags out, seq out, ack out)
        (0x02, 1000, 0, b"", (0x14, 0, 1001)),  # SYN: RST|ACK, ack = seq + 1
        (0x18, 5000, 7777, b"0123456789", (0x04, 7777, 0)),  # ACK with data: RST, seq = its ack
        (0x11, 9000, 4242, b"", (0x04, 4242, 0)),  # FIN|ACK
        (0x01, 300, 0, b"abc", (0x14, 0, 304)),  # FIN without ACK: ack = seq + 3 + 1
    ]
    for i, (flags, seq, ack, payload, (want_flags, want_seq, want_ack)) in enumerate(cases):
        sport = 41000 + i
        seg = tcp_segment(INET, str(PUBLIC), sport, 9, seq, ack, flags, payload)
        frame = send_and_catch(dplab, ipv4_frame(up0, me, INET, str(PUBLIC), TCP, seg), TCP)
        assert frame[:6] == mac_raw(me) and frame[6:12] == mac_raw(up0), "MACs swapped"
        check_ipv4(frame, TCP, 40)
        tcp = frame[34:54]
        got_sport, got_dport, got_seq, got_ack, off, got_flags = struct.unpack("!HHIIBB", tcp[:14])
        assert (got_sport, got_dport, off >> 4) == (9, sport, 5)
        assert (got_flags, got_seq, got_ack) == (want_flags, want_seq, want_ack), (i, got_flags, got_seq, got_ack)
        pseudo = frame[26:34] + struct.pack("!BBH", 0, TCP, 20)
        assert csum(pseudo + tcp) == 0, "TCP checksum"


def test_port_unreachable_quotes_the_datagram(dplab: Dplab) -> None:
    up0, me = mac_of(dplab.host, "up0"), mac_of(dplab.inet, "eth0")
    payload = b"x" * 100
    udp = struct.pack("!HHHH", 42000, 9, 8 + len(payload), 0) + payload
    sent = bytes.fromhex(ipv4_frame(up0, me, INET, str(PUBLIC), UDP, udp))
    frame = send_and_catch(dplab, sent.hex(), ICMP)
    check_ipv4(frame, ICMP, 20 + 8 + 28)
    icmp = frame[34:]
    assert icmp[0:2] == bytes([3, 3]) and csum(icmp) == 0, icmp.hex()
    assert icmp[8:36] == sent[14:42], "quotes the IP header and 8 bytes"


def test_arp_and_frames_from_a_container_that_are_dropped(dplab: Dplab) -> None:
    a, b = dplab.a, dplab.b

    def arp(sha: str, spa: str, tpa: str, src_mac: str = "") -> str:
        body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac_raw(sha), socket.inet_aton(spa), b"\0" * 6,
                           socket.inet_aton(tpa))
        return (b"\xff" * 6 + mac_raw(src_mac or sha) + b"\x08\x06" + body).hex()

    rec = dplab.start(a.ns, "python3", "-u", str(TOOLS / "probes.py"), "arp-record", "--ifname", "eth0",
                      "--until-sha", GATEWAY_MAC, "--grace", "0.3", "--seconds", "5", ready="READY")
    before = dplab.drops()
    frames = [
        arp(b.mac, str(PUBLIC), "169.254.1.1", src_mac=a.mac),  # sha of another container
        arp(a.mac, "203.0.113.99", "169.254.1.1"),  # spa not its own
        arp(a.mac, str(PUBLIC), "198.51.100.1"),  # asks for neither the gateway nor a pool address
        (b"\xff" * 6 + mac_raw(a.mac) + b"\x86\xdd" + b"\0" * 40).hex(),  # IPv6: not for this datapath
        arp(a.mac, str(PUBLIC), "169.254.1.1"),  # the legitimate request (positive control)
    ]
    dplab.tool(a.ns, "clients.py", "raw-send", "--ifname", "eth0", *frames)
    replies = json.loads(dplab.rest(rec, timeout=10))["replies"]
    assert replies == [GATEWAY_MAC], replies
    after = dplab.drops()
    assert after[D.SPOOF_ARP] - before[D.SPOOF_ARP] == 2
    assert after[D.NOT_IP] - before[D.NOT_IP] == 2


def test_frames_from_an_unknown_port_are_dropped(dplab: Dplab) -> None:
    """A veth with the program attached but no ``ports`` entry (a container not yet, or no longer, known)."""
    z = dplab.netns(f"{dplab.prefix}z")
    dplab.x(z, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
    sh("ip", "-n", dplab.host, "link", "add", "vz", "type", "veth", "peer", "name", "eth0", "netns", z)
    dplab.x(dplab.host, "ip", "link", "set", "vz", "up")
    dplab.x(z, "ip", "link", "set", "eth0", "up")
    dplab.x(dplab.host, PY, "-m", "tests.ebpf.nstool", "attach", str(dplab.obj), str(dplab.pin), "pm_from_container=vz")
    before = dplab.drops()[D.UNKNOWN_PORT]
    udp = struct.pack("!HHHH", dplab.a.block, 9000, 8, 0)
    frame = ipv4_frame(GATEWAY_MAC, dplab.a.mac, str(PUBLIC), INET, UDP, udp)  # even with a's own addresses
    dplab.tool(z, "clients.py", "raw-send", "--ifname", "eth0", frame, frame, frame)
    assert dplab.drops()[D.UNKNOWN_PORT] - before == 3


def icmp_error_frame(lab: Dplab, quoted_dport: int) -> str:
    """From a: port unreachable to inet, quoting a datagram inet sent to PUBLIC:quoted_dport."""
    a = lab.a
    quoted_udp = struct.pack("!HHHH", 43000, quoted_dport, 8, 0)
    quoted = bytes.fromhex(ipv4_frame(GATEWAY_MAC, a.mac, INET, str(PUBLIC), UDP, quoted_udp))[14:]
    body = struct.pack("!BBHI", 3, 3, 0, 0) + quoted
    body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
    return ipv4_frame(GATEWAY_MAC, a.mac, str(PUBLIC), INET, ICMP, body)


def test_icmp_errors_cross_only_for_the_senders_own_ports(dplab: Dplab) -> None:
    """Errors a container sends must quote a packet to its own port; errors for a container find it."""
    a, b = dplab.a, dplab.b
    for quoted_port, arrives in ((b.port, False), (b.block + 3, False), (a.port, True), (a.block + 3, True)):
        before = dplab.drops()[D.ICMP]
        catcher = dplab.start(dplab.inet, PY, "-m", "tests.ebpf.nstool", "catch", "eth0", str(PUBLIC), str(ICMP),
                              "1" if not arrives else "5", ready="READY")
        dplab.tool(a.ns, "clients.py", "raw-send", "--ifname", "eth0", icmp_error_frame(dplab, quoted_port))
        caught = dplab.rest(catcher, timeout=10).strip()
        assert bool(caught) == arrives, (quoted_port, caught)
        assert dplab.drops()[D.ICMP] - before == (0 if arrives else 1)
    # The other way: inet's kernel refuses a's datagram to a closed port; the error finds a by its block.
    out = dplab.tool(a.ns, "clients.py", "udp-refused", "--host", INET, "--port", "9")
    assert out["outcome"] == "refused", out
    # And a's own kernel refuses a datagram to a mapped port nobody listens on: it reaches inet.
    key = layout.MappingKey(ip=layout.be32(PUBLIC), port=layout.be16(8091), proto=UDP)
    with dplab.map("mappings") as m:
        m.update(bytes(key), bytes(dplab.local(a)))
    out = dplab.tool(dplab.inet, "clients.py", "udp-refused", "--host", str(PUBLIC), "--port", "8091")
    assert out["outcome"] == "refused", out


def test_fragments_and_ip_options_for_a_pool_are_dropped_at_the_uplink(dplab: Dplab) -> None:
    """Only plain 20-byte unfragmented headers are classified; the others for a pool are counted, not
    left to the host's routing. The host's own address is not the program's business (not counted)."""
    up0, me = mac_of(dplab.host, "up0"), mac_of(dplab.inet, "eth0")
    udp = struct.pack("!HHHH", 42000, dplab.a.port, 12, 0) + b"frag"

    def frame(dst: str, frag: int, options: bytes) -> str:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45 + len(options) // 4, 0, 20 + len(options) + len(udp), 1, frag, 64,
                         UDP, 0, socket.inet_aton(INET), socket.inet_aton(dst)) + options
        ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
        return (mac_raw(up0) + mac_raw(me) + b"\x08\x00" + ip + udp).hex()

    before = dplab.drops()[D.NOT_IP]
    frames = [
        frame(str(PUBLIC), 0x2000, b""),  # first fragment (MF)
        frame(str(PUBLIC), 0x0010, b""),  # a later fragment
        frame(str(PUBLIC), 0, b"\x01\x01\x01\x00"),  # NOP NOP NOP EOL options
        frame("198.51.100.1", 0, b"\x01\x01\x01\x00"),  # the host's own: passed to its kernel
    ]
    dplab.tool(dplab.inet, "clients.py", "raw-send", "--ifname", "eth0", *frames)
    assert dplab.drops()[D.NOT_IP] - before == 3
