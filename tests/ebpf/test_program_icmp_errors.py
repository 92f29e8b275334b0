"""The gateway hop's ICMP errors, on real packets: time exceeded, fragmentation needed, the rate limit.

A Linux router (the host kernel on an OVS gateway) answers a container's TTL-1 packet with time
exceeded and a DF packet too big for the next hop with fragmentation needed, both from the gateway
address 169.254.1.1 (measured on the OVS lab: tests/lab/test_icmp.py), and sends at most 1000 ICMP
errors a second after a burst of 50. The program does the same (route.h, answers.h); these tests
check the bytes that arrive, the counters, and a positive control for each refusal.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator

import pytest

from portmesh.agent.ebpf import layout
from tests.ebpf.conftest import GATEWAY_IP, INET, PUBLIC, PY, ROOT, Dplab, csum

D = layout.DropReason
PROBE = str(ROOT / "tests" / "ebpf" / "icmp_probe.py")
NARROW_MTU = 1200
SINK_PORT = 9100

# inet: a TCP sink that reads to EOF and answers with the byte count.
SINK = f"""
import socket
srv = socket.create_server(("0.0.0.0", {SINK_PORT}))
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    conn.settimeout(20)
    total = 0
    try:
        while chunk := conn.recv(65536):
            total += len(chunk)
        conn.sendall(str(total).encode())
    except OSError:
        pass
    conn.close()
"""

# A container sends N bytes to the sink; prints the reply and the path MTU its kernel learnt.
BULK = f"""
import json, socket, subprocess, sys
size = int(sys.argv[1])
try:
    s = socket.create_connection(("{INET}", {SINK_PORT}), timeout=8)
    s.sendall(b"x" * size)
    s.shutdown(socket.SHUT_WR)
    reply = s.recv(100).decode()
except OSError as exc:
    reply = repr(exc)
route = subprocess.run(["ip", "route", "get", "{INET}"], capture_output=True, text=True).stdout
print(json.dumps({{"reply": reply, "route": route}}))
"""


def probe(dplab: Dplab, ns: str, *args: str, dst: str = INET, port: int = 9000) -> dict[str, object]:
    out: dict[str, object] = json.loads(dplab.x(ns, PY, PROBE, dst, str(port), *args, timeout=60))
    return out


def first_error(result: dict[str, object]) -> tuple[str, bytes]:
    kept = result["kept"]
    assert isinstance(kept, list) and kept, result
    return str(kept[0]["src"]), bytes.fromhex(kept[0]["hex"])


def check_error(data: bytes, icmp_type: int, code: int, quoted_ttl: int, sport: int, dport: int) -> int:
    """Type, code, both checksums and the quote (our datagram's header and UDP ports); the header's
    second word (the next-hop MTU of fragmentation needed)."""
    assert data[0] == 0x45 and csum(data[:20]) == 0, data[:20].hex()
    total = struct.unpack_from("!H", data, 2)[0]
    assert total == len(data) == 20 + 8 + 20 + 8, data.hex()
    assert socket.inet_ntoa(data[12:16]) == str(GATEWAY_IP) and socket.inet_ntoa(data[16:20]) == str(PUBLIC)
    icmp = data[20:]
    assert (icmp[0], icmp[1]) == (icmp_type, code) and csum(icmp) == 0, icmp.hex()
    quoted = icmp[8:28]
    assert quoted[9] == socket.IPPROTO_UDP and quoted[8] == quoted_ttl, quoted.hex()
    assert socket.inet_ntoa(quoted[12:16]) == str(PUBLIC) and socket.inet_ntoa(quoted[16:20]) == INET
    assert struct.unpack_from("!HH", icmp, 28) == (sport, dport)
    return int(struct.unpack_from("!I", icmp, 4)[0])


@pytest.fixture
def narrow_uplink(dplab: Dplab) -> Iterator[None]:
    """The host's uplink (the next hop's device) at NARROW_MTU; the containers forget learnt MTUs."""
    dplab.x(dplab.host, "ip", "link", "set", "up0", "mtu", str(NARROW_MTU))
    try:
        yield
    finally:
        dplab.x(dplab.host, "ip", "link", "set", "up0", "mtu", "1500")
        for c in (dplab.a, dplab.b):
            dplab.x(c.ns, "ip", "route", "flush", "cache")


def test_ttl_1_gets_time_exceeded_from_the_gateway(dplab: Dplab) -> None:
    """A traceroute's first hop: the gateway answers, with the quote of the probe, from 169.254.1.1."""
    control = probe(dplab, dplab.a.ns, "--ttl", "2")  # one hop to spare: whoami in inet answers
    assert control["replies"] == 1 and control["errors"] == 0, control
    before = dplab.drops()
    result = probe(dplab, dplab.a.ns, "--ttl", "1")
    assert result["replies"] == 0 and result["errors"] == 1, result
    src, data = first_error(result)
    assert src == str(GATEWAY_IP)
    assert check_error(data, 11, 0, 1, int(str(result["sport"])), 9000) == 0
    after = dplab.drops()
    assert after[D.TTL_EXCEEDED] - before[D.TTL_EXCEEDED] == 1 and after[D.NO_ROUTE] == before[D.NO_ROUTE]


def test_ping_ttl_1_reads_time_to_live_exceeded(dplab: Dplab) -> None:
    """ping as a user runs it: -t 1 is answered by the gateway, -t 2 by inet."""
    dplab.x(dplab.b.ns, "ping", "-c1", "-W1", "-t2", INET)
    out = dplab.x(dplab.b.ns, "ping", "-c1", "-W2", "-t1", INET, check=False)
    assert f"From {GATEWAY_IP}" in out and "Time to live exceeded" in out, out


def test_too_big_with_df_gets_fragmentation_needed(dplab: Dplab, narrow_uplink: None) -> None:
    fits = probe(dplab, dplab.a.ns, "--df", "--size", str(NARROW_MTU - 28))  # exactly the hop's MTU: passes
    assert fits["replies"] == 1 and fits["errors"] == 0, fits
    before = dplab.drops()
    result = probe(dplab, dplab.a.ns, "--df", "--size", "1300")
    assert result["replies"] == 0 and result["errors"] == 1, result
    src, data = first_error(result)
    assert src == str(GATEWAY_IP)
    assert check_error(data, 3, 4, 64, int(str(result["sport"])), 9000) == NARROW_MTU
    assert f"mtu {NARROW_MTU}" in str(result["route"]), result  # the container's kernel learnt it
    after = dplab.drops()
    assert after[D.TOO_BIG] - before[D.TOO_BIG] == 1 and after[D.NO_ROUTE] == before[D.NO_ROUTE]


@pytest.mark.parametrize("offload", ["on", "off"])
def test_tcp_through_a_narrow_hop_learns_the_path_mtu(dplab: Dplab, narrow_uplink: None, offload: str) -> None:
    """200 kB through the 1200-byte hop: with TSO (GSO packets, checked by segment size) and without
    (plain 1500-byte packets), the gateway's fragmentation needed teaches b's kernel and every byte
    gets through (before, both were dropped: a black hole)."""
    sink = dplab.start(dplab.inet, PY, "-u", "-c", SINK, ready="ready")
    b = dplab.b
    dplab.x(b.ns, "ethtool", "-K", "eth0", "tso", offload, "gso", offload)
    before = dplab.drops()[D.TOO_BIG]
    try:
        control = json.loads(dplab.x(b.ns, PY, "-c", BULK, "200"))  # small: fits, nothing learnt
        assert control["reply"] == "200" and "mtu" not in control["route"], control
        big = json.loads(dplab.x(b.ns, PY, "-c", BULK, "200000", timeout=30))
    finally:
        dplab.x(b.ns, "ethtool", "-K", "eth0", "tso", "on", "gso", "on")
        dplab.stop(sink)
    assert big["reply"] == "200000" and f"mtu {NARROW_MTU}" in big["route"], big
    assert dplab.drops()[D.TOO_BIG] > before


def test_icmp_errors_are_rate_limited(dplab: Dplab) -> None:
    """1000 errors/s after a burst of 50, as Linux (icmp_msgs_per_sec, icmp_msgs_burst).

    Control first: 100 TTL-1 probes 4 ms apart (250/s, under the limit) are each answered. Then 3000
    as fast as the container sends them: at most burst + rate x (first send to last error heard: the
    program may still be working through the sends when the loop ends) are answered, and each of
    the others is counted as ICMP_LIMIT."""
    paced = probe(dplab, dplab.a.ns, "--ttl", "1", "--count", "100", "--interval", "0.004")
    assert paced["sent"] == 100 and paced["errors"] == 100, paced
    before = dplab.drops()
    flood = probe(dplab, dplab.a.ns, "--ttl", "1", "--count", "3000", "--wait", "1")
    after = dplab.drops()
    sent, answered, elapsed = int(str(flood["sent"])), int(str(flood["errors"])), float(str(flood["last_error"]))
    allowed = layout.ICMP_BURST + layout.ICMP_RATE * elapsed + 2
    assert sent == 3000 and layout.ICMP_BURST // 2 <= answered <= allowed, (answered, allowed, elapsed)
    assert after[D.TTL_EXCEEDED] - before[D.TTL_EXCEEDED] == answered
    assert after[D.ICMP_LIMIT] - before[D.ICMP_LIMIT] == sent - answered


def test_port_unreachable_shares_the_limit_and_resets_do_not(dplab: Dplab) -> None:
    """From inet to an unmapped UDP port of the public IP: 2000 datagrams at once get at most burst +
    rate x time port unreachables; a TCP connection to an unmapped port right after is still reset."""
    before = dplab.drops()
    flood = probe(dplab, dplab.inet, "--count", "2000", "--wait", "1", dst=str(PUBLIC), port=7)
    answered, elapsed = int(str(flood["errors"])), float(str(flood["last_error"]))
    assert answered <= layout.ICMP_BURST + layout.ICMP_RATE * elapsed + 2, flood
    after = dplab.drops()
    assert after[D.ICMP_LIMIT] - before[D.ICMP_LIMIT] == 2000 - answered > 0
    assert after[D.REFUSED] - before[D.REFUSED] == answered
    refused = dplab.tool(dplab.inet, "clients.py", "tcp-refused", "--host", str(PUBLIC), "--port", "7")
    assert refused["outcome"] == "refused", refused


def test_the_answer_goes_only_to_the_sender(dplab: Dplab) -> None:
    """a and b share 203.0.113.10: b's probe's time exceeded reaches b, and a hears nothing of it
    (control: a's own probe is answered to a)."""
    mine = probe(dplab, dplab.a.ns, "--ttl", "1")
    assert mine["errors"] == 1, mine
    listener = dplab.start(dplab.a.ns, PY, "-u", "-c", LISTEN, ready="ready")
    theirs = probe(dplab, dplab.b.ns, "--ttl", "1")
    assert theirs["errors"] == 1, theirs
    out = dplab.rest(listener, timeout=10)
    assert json.loads(out.strip().splitlines()[-1])["heard"] == 0, out


# a: every ICMP time exceeded heard for 1 s.
LISTEN = """
import json, select, socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
print("ready", flush=True)
heard, end = 0, time.monotonic() + 1.5
while (left := end - time.monotonic()) > 0:
    if select.select([s], [], [], left)[0]:
        heard += s.recv(2048)[20] == 11
print(json.dumps({"heard": heard}), flush=True)
"""

