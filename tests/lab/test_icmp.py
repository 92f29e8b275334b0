"""Tier 3, ICMP as users expect it (issue 11.4): a real lab, real kernels answering and reacting.

- Two containers sharing one public IP ping `inet` at the same time; each gets its own replies.
- ICMP errors about a container's connection reach it: port unreachable (a connected UDP socket
  gets ECONNREFUSED), time exceeded (the gateway hop, a router, drops a TTL-1 datagram and answers
  from 169.254.1.1; the socket's error queue says so), fragmentation needed (the host's uplink MTU is
  lowered; the container's kernel learns the path MTU and the transfer completes). On OVS the host
  kernel is that router; on eBPF the program's gateway hop answers the same (docs/ebpf.md).
- A container's own ICMP error passes when it quotes one of its ports, never when it quotes a
  sharer's: a recorder in `inet` hears the control and not the forgery.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from portmesh.agent.ebpf.layout import DropReason
from portmesh.lab import node
from portmesh.lab.network import INET_IP, Lab
from portmesh.model.config import NetworkConfig
from tests.lab.conftest import lab_suffix
from tests.lab.test_mapping_e2e import Cloud, keep_logs
from tests.lab.tools import t4_ebpf

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(shutil.which("ovs-vswitchd") is None, reason="openvswitch-switch is not installed"),
]

IP10 = "203.0.113.10"
SINK_PORT = 7100
GATEWAY_IP = "169.254.1.1"  # the containers' gateway (config.gateway_ip): the source of the gateway hop's errors
UPLINK = "up0"  # the host's interface towards inet: the router hop whose MTU is lowered

# A TCP sink in inet: reads to EOF, answers with the byte count.
SINK = f"""
import socket
srv = socket.create_server(("0.0.0.0", {SINK_PORT}))
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    conn.settimeout(30)
    total = 0
    while chunk := conn.recv(65536):
        total += len(chunk)
    conn.sendall(str(total).encode())
    conn.close()
"""

# A container sends BYTES to the sink; prints what came back and what its kernel learnt about the path.
BULK = """
import json, socket, subprocess, sys
host, port, size, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
try:
    s = socket.create_connection((host, port), timeout=timeout)
    s.sendall(b"x" * size)
    s.shutdown(socket.SHUT_WR)
    reply = s.recv(100).decode()
except OSError as exc:
    reply = repr(exc)
route = subprocess.run(["ip", "route", "get", host], capture_output=True, text=True).stdout
print(json.dumps({"reply": reply, "route": route}))
"""

# A container's UDP sockets: a closed port answered by inet's kernel, and a TTL-1 datagram the host drops.
UDP_ERRORS = """
import json, select, socket, struct, sys
host = sys.argv[1]
out = {}
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.connect((host, 9))
s.send(b"anyone?")
try:
    s.recv(100)
    out["refused"] = "answered"
except ConnectionRefusedError:
    out["refused"] = "ECONNREFUSED"
except socket.timeout:
    out["refused"] = "timeout"
out["refused_port"] = s.getsockname()[1]
t = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
t.setsockopt(socket.IPPROTO_IP, 11, 1)  # IP_RECVERR
t.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
t.connect((host, 33434))
t.send(b"ttl 1")
poller = select.poll()
poller.register(t, select.POLLERR)
if poller.poll(5000):
    _data, anc, _flags, _addr = t.recvmsg(512, 512, socket.MSG_ERRQUEUE)
    for level, kind, data in anc:
        if level == socket.IPPROTO_IP and kind == 11:
            _errno, origin, icmp_type, code = struct.unpack_from("=IBBB", data)
            offender = socket.inet_ntoa(data[20:24])
            out["errqueue"] = {"origin": origin, "type": icmp_type, "code": code, "from": offender}
else:
    out["errqueue"] = "timeout"
print(json.dumps(out))
"""

# inet: every ICMP destination unreachable that arrives, with the port its quote was addressed to.
RECORDER = """
import json, socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(0.5)
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    try:
        data, (src, _) = s.recvfrom(2048)
    except socket.timeout:
        continue
    ihl = (data[0] & 15) * 4
    icmp_type, code = data[ihl], data[ihl + 1]
    if icmp_type != 3:
        continue
    inner = data[ihl + 8:]
    inner_ihl = (inner[0] & 15) * 4
    sport, dport = struct.unpack_from("!HH", inner, inner_ihl)
    print(json.dumps({"src": src, "code": code, "quoted_dst": socket.inet_ntoa(inner[16:20]), "quoted_dport": dport}),
          flush=True)
"""

# A container sends a port unreachable to inet, quoting a TCP segment inet sent to (IP10, DPORT).
FORGE = """
import socket, sys
import os_ken.base.app_manager
from os_ken.lib.packet import icmp, ipv4, packet, tcp
dest, quoted_dst, dport = sys.argv[1], sys.argv[2], int(sys.argv[3])
q = packet.Packet()
q.add_protocol(ipv4.ipv4(src=dest, dst=quoted_dst, proto=6))
q.add_protocol(tcp.tcp(src_port=5555, dst_port=dport))
q.add_protocol(b"12345678")
q.serialize()
msg = icmp.icmp(type_=3, code=3, data=icmp.dest_unreach(data=bytes(q.data)[:28]))
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.sendto(msg.serialize(bytearray(), None), (dest, 0))
"""


def py(cloud: Cloud, where: str, script: str, *args: str, timeout: float = 60) -> dict[str, object]:
    """Run ``script`` with this interpreter inside ``where``'s namespace; its last line is JSON."""
    done = node.run([sys.executable, "-c", script, *args], netns=cloud.netns(where), check=False, timeout=timeout)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def spawn_ready(cloud: Cloud, where: str, script: str, *args: str) -> subprocess.Popen[str]:
    """Start ``script`` in ``where`` and return once it printed 'ready' (it has its socket open)."""
    proc = subprocess.Popen(["ip", "netns", "exec", cloud.netns(where), sys.executable, "-u", "-c", script, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"{where}: helper did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cloud(datapath: str) -> Iterator[Cloud]:
    lab = Lab(f"ic{os.getpid() % 10000}{lab_suffix(datapath)}", say=lambda _msg: None)
    sink: subprocess.Popen[str] | None = None
    try:
        state = lab.up(hosts=1, datapath=datapath)
        c = Cloud(state, datapath)
        c.run_container("pa", IP10, "80/tcp")
        c.run_container("pb", IP10, "8080/tcp")
        sink = spawn_ready(c, "inet", SINK)
        yield c
    finally:
        if sink is not None:
            stop(sink)
        keep_logs(lab)
        lab.down()


def test_sharers_ping_outside_at_once_and_each_gets_its_replies(cloud: Cloud) -> None:
    pings = {
        name: subprocess.Popen(["ip", "netns", "exec", cloud.netns(name), "ping", "-c", "10", "-i", "0.1", "-W", "2",
                                INET_IP], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name in ("pa", "pb")
    }
    for name, proc in pings.items():
        out, _ = proc.communicate(timeout=30)
        # ping counts only replies with its own echo id: a reply delivered to the wrong sharer is lost.
        assert proc.returncode == 0 and "10 packets transmitted, 10 received" in out, (name, out)
        assert "DUP!" not in out, (name, out)


def test_port_unreachable_and_time_exceeded_reach_the_container(cloud: Cloud) -> None:
    before = drops(cloud)
    result = py(cloud, "pa", UDP_ERRORS, INET_IP)
    assert result["refused"] == "ECONNREFUSED", result  # inet's kernel: port unreachable, delivered to pa
    err = result["errqueue"]
    assert isinstance(err, dict), result
    # ICMP (origin 2) time exceeded (11) from the gateway address: on OVS the host kernel that would have
    # forwarded it (its source, measured: 169.254.1.1), on eBPF the program's gateway hop, alike.
    assert err["origin"] == 2 and err["type"] == 11 and err["code"] == 0, result
    assert err["from"] == GATEWAY_IP, result
    if cloud.datapath == "ebpf":
        assert drops(cloud)[DropReason.TTL_EXCEEDED] > before[DropReason.TTL_EXCEEDED], result


def drops(cloud: Cloud) -> dict[DropReason, int]:
    """The eBPF gateway host's drop counters (all zero on OVS, which counts none of these)."""
    if cloud.datapath != "ebpf":
        return dict.fromkeys(DropReason, 0)
    return t4_ebpf.drops(cloud.state, "h1")


PROBE = str(Path(__file__).resolve().parents[1] / "ebpf" / "icmp_probe.py")


def test_the_gateways_icmp_errors_are_rate_limited(cloud: Cloud) -> None:
    """2000 TTL-1 probes from pa at once: the gateway hop answers at most a burst of 50 plus 1000 a
    second (OVS: the host kernel's icmp_msgs_per_sec/burst, and its per-destination limit below that;
    eBPF: the program's bucket, every unanswered probe counted as ICMP_LIMIT). Control: the first
    probes are answered, from 169.254.1.1."""
    before = drops(cloud)
    done = node.run([sys.executable, PROBE, INET_IP, "33434", "--ttl", "1", "--count", "2000", "--wait", "2"],
                    netns=cloud.netns("pa"), check=True, timeout=60)
    flood = json.loads(done.stdout)
    answered, elapsed = int(flood["errors"]), float(flood["last_error"])
    print(f"{cloud.datapath}: {answered} of {flood['sent']} TTL-1 probes answered in {elapsed:.3f} s")
    assert flood["sent"] == 2000 and answered >= 1 and flood["kept"][0]["src"] == GATEWAY_IP, flood
    assert answered <= 50 + 1000 * elapsed + 2, (answered, elapsed)
    if cloud.datapath == "ebpf":
        after = drops(cloud)
        assert after[DropReason.ICMP_LIMIT] - before[DropReason.ICMP_LIMIT] == 2000 - answered


NARROW_MTU = 1200  # below the 1280 of br0 (config.egress_mtu)


def set_uplink_mtu(cloud: Cloud, mtu: int) -> None:
    """Set h1's uplink MTU and wait until the agent has given pa's and pb's eth0 the MTU that follows from it
    (the uplink's when larger than the tunnels', NetworkConfig.container_mtus; read on its full passes).

    A transfer must not straddle that re-plumb: eth0's MTU changing under it is not what these tests follow."""
    node.run(["ip", "link", "set", UPLINK, "mtu", str(mtu)], netns=cloud.netns("h1"), check=True)
    want = NetworkConfig().container_mtus(mtu)[0]

    def eth0_mtus() -> set[int]:
        return {int(json.loads(node.run(["ip", "-j", "link", "show", "eth0"], netns=cloud.netns(c), check=True).stdout)[0]["mtu"])
                for c in ("pa", "pb")}

    deadline = time.monotonic() + 20
    while eth0_mtus() != {want}:
        assert time.monotonic() < deadline, f"eth0 of pa/pb not at MTU {want} within 20 s of up0 at {mtu}: {eth0_mtus()}"
        time.sleep(0.1)


def test_fragmentation_needed_teaches_the_container_the_path_mtu(cloud: Cloud) -> None:
    """The host's uplink (a router hop) drops to MTU 1200; its frag-needed reaches pb, which sends smaller.

    1200 is below br0's MTU (config.egress_mtu, 1280), which is what bounds the segments OVS 3.1's
    userspace datapath cuts a TSO frame into for LOCAL (gso_size = LOCAL's MTU - headers, whatever
    MSS the sender chose): paths down to 1280 need no ICMP at all (test_multihost), narrower ones
    need the frag-needed this test follows. pb sends without TSO/GSO in the second phase: with
    offload, pb's kernel learns the MTU (the first phase) but the transfer would stall below 1280.
    """
    pb = cloud.netns("pb")
    node.run(["ip", "route", "flush", "cache"], netns=pb, check=True)
    before = node.run(["ip", "route", "get", INET_IP], netns=pb, check=True).stdout
    assert "mtu" not in before, before  # nothing learnt yet: the control for the assertions below
    set_uplink_mtu(cloud, NARROW_MTU)
    try:
        counted = drops(cloud)
        # With offloads on: the frag-needed arrives and the kernel learns, though OVS re-segments (see above);
        # on eBPF the program checks the GSO packet's segments against the hop, as h1's kernel does.
        learnt = str(py(cloud, "pb", BULK, INET_IP, str(SINK_PORT), "200000", "3")["route"])
        assert re.search(rf"\bmtu {NARROW_MTU}\b", learnt), learnt
        node.run(["ip", "route", "flush", "cache"], netns=pb, check=True)
        node.run(["ethtool", "-K", "eth0", "tso", "off", "gso", "off"], netns=pb, check=True)
        try:
            result = py(cloud, "pb", BULK, INET_IP, str(SINK_PORT), str(2_000_000), "20")
        finally:
            node.run(["ethtool", "-K", "eth0", "tso", "on", "gso", "on"], netns=pb, check=True)
    finally:
        set_uplink_mtu(cloud, 1500)
    assert result["reply"] == "2000000", result  # no black hole: every byte got through the narrow hop
    route = str(result["route"])
    assert re.search(rf"\bmtu {NARROW_MTU}\b", route), route  # learnt again, from this transfer's frag-needed
    if cloud.datapath == "ebpf":  # answered by the program's gateway hop (not dropped as NO_ROUTE, as before)
        assert drops(cloud)[DropReason.TOO_BIG] > counted[DropReason.TOO_BIG]


def test_tso_segments_never_cross_a_narrower_hop_unchecked(cloud: Cloud, request: pytest.FixtureRequest) -> None:
    """With TSO on, 200 kB from pa through the 1200-byte hop: either pa learns the path MTU first (OVS:
    h1's kernel checks each GSO packet's segment size, sends frag-needed) or the bytes do not get
    through -- 1448-byte segments arriving across a 1200-byte link without pa learning anything
    would be a black hole on a real link (a NIC cuts at the segment size the hop cannot carry)."""
    pa = cloud.netns("pa")
    node.run(["ip", "route", "flush", "cache"], netns=pa, check=True)
    # Control: the sink answers (it serves one connection at a time; a transfer stalled by an earlier
    # test holds it for up to its 30 s timeout), so "did not get through" below is the hop's doing.
    control = py(cloud, "pa", BULK, INET_IP, str(SINK_PORT), "200", "40")
    assert control["reply"] == "200", control
    set_uplink_mtu(cloud, NARROW_MTU)
    try:
        result = py(cloud, "pa", BULK, INET_IP, str(SINK_PORT), "200000", "3")
    finally:
        set_uplink_mtu(cloud, 1500)
        node.run(["ip", "route", "flush", "cache"], netns=pa, check=True)
    crossed = result["reply"] == "200000"
    assert not crossed or re.search(rf"\bmtu {NARROW_MTU}\b", str(result["route"])), result


def test_container_errors_pass_only_about_its_own_ports(cloud: Cloud) -> None:
    recorder = spawn_ready(cloud, "inet", RECORDER, "20")
    try:
        # pa forges an error about a datagram sent to pb's service port, then a true one about its own.
        py_send = [sys.executable, "-c", FORGE]
        node.run([*py_send, INET_IP, IP10, "8080"], netns=cloud.netns("pa"), check=True)
        node.run([*py_send, INET_IP, IP10, "80"], netns=cloud.netns("pa"), check=True)
        assert recorder.stdout is not None
        heard = []
        for line in recorder.stdout:
            heard.append(json.loads(line))
            if heard[-1]["quoted_dport"] == 80:
                break
    finally:
        stop(recorder)
    assert [h["quoted_dport"] for h in heard] == [80], heard
    assert heard[0]["src"] == IP10 and heard[0]["quoted_dst"] == IP10
