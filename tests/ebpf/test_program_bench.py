"""Throughput through the datapath program vs a direct veth, measured in one run (nothing asserted
on time). Opt-in: ``PM_EBPF_BENCH=1 pytest -s tests/ebpf/test_program_bench.py``.

iperf3 from inet to a container's mapped port goes uplink -> program -> container; the baseline is
iperf3 from inet to the host's own uplink address (the same veth, no program in the way, one
namespace hop less). Both delivery variants are measured by attaching a second build of the same
source (-DPM_NO_REDIRECT_PEER) over the same pinned maps: bpf_redirect_peer (the container's
ingress directly) vs bpf_redirect (the host end's egress, then the veth's own xmit path).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from pathlib import Path

import pytest

from portmesh.agent.ebpf import build, layout

from .conftest import HOST_UP, PUBLIC, PY, Dplab

pytestmark = pytest.mark.skipif(os.environ.get("PM_EBPF_BENCH") != "1", reason="benchmark: PM_EBPF_BENCH=1")

SECONDS = os.environ.get("PM_EBPF_BENCH_SECONDS", "4")
ROUNDS = int(os.environ.get("PM_EBPF_BENCH_ROUNDS", "2"))
IPERF_PORT = 5201


# One UDP request/response at a time, N times: the median round trip in microseconds (latency shows
# what a redirect saves better than a bulk stream, which is bound by the TCP stacks' CPU).
RR = """
import socket, statistics, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
s.connect((sys.argv[1], int(sys.argv[2])))
rtts = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter()
    s.send(b"x")
    s.recv(512)
    rtts.append(time.perf_counter() - t)
print(statistics.median(rtts) * 1e6)
"""


def rr_us(lab: Dplab, host: str, port: int) -> float:
    return float(lab.x(lab.inet, PY, "-c", RR, host, str(port), "3000", timeout=60))


def iperf(lab: Dplab, host: str) -> float:
    out = lab.x(lab.inet, "iperf3", "-c", host, "-p", str(IPERF_PORT), "-t", SECONDS, "-J", timeout=60)
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


def test_iperf_through_the_program_vs_direct_veth(dplab: Dplab, tmp_path: Path) -> None:
    a = dplab.a
    key = layout.MappingKey(ip=layout.be32(PUBLIC), port=layout.be16(IPERF_PORT), proto=layout.IPPROTO_TCP)
    dest = layout.Dest(mac=layout.mac_bytes(a.mac), flags=layout.DEST_LOCAL, ifindex=a.ifindex, owner=a.ifindex)
    with dplab.map("mappings") as m:
        m.update(bytes(key), bytes(dest))
    no_peer = tmp_path / "datapath-no-peer.o"
    subprocess.run([build.CLANG, *build.CFLAGS, "-DPM_NO_REDIRECT_PEER", f"-I{build.SOURCE.parent}", "-c",
                    str(build.SOURCE), "-o", str(no_peer)], check=True)
    dplab.start(a.ns, "stdbuf", "-oL", "iperf3", "-s", "-p", str(IPERF_PORT), ready="Server listening")
    dplab.start(dplab.host, "stdbuf", "-oL", "iperf3", "-s", "-p", str(IPERF_PORT), ready="Server listening")
    dplab.whoami(dplab.host, "host", [], [7000])  # the direct-veth peer for the round trips
    rows: list[tuple[str, float]] = []
    rtts: list[tuple[str, float]] = []
    for _ in range(ROUNDS):  # alternate, so every variant sees about the same machine load
        rows.append(("direct veth (inet -> host up0)", iperf(dplab, HOST_UP)))
        rtts.append(("direct veth (inet -> host up0)", rr_us(dplab, HOST_UP, 7000)))
        dplab.attach(dplab.obj)
        rows.append(("program, bpf_redirect_peer", iperf(dplab, str(PUBLIC))))
        rtts.append(("program, bpf_redirect_peer", rr_us(dplab, str(PUBLIC), a.port)))
        dplab.attach(no_peer)
        rows.append(("program, bpf_redirect", iperf(dplab, str(PUBLIC))))
        rtts.append(("program, bpf_redirect", rr_us(dplab, str(PUBLIC), a.port)))
        dplab.attach(dplab.obj)
    print(f"\niperf3 inet -> ..., {SECONDS} s each, load {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
    for name, gbps in rows:
        print(f"  {name:34s} {gbps:6.2f} Gbit/s")
    for name in dict(rows):
        print(f"  median {name:27s} {statistics.median(g for n, g in rows if n == name):6.2f} Gbit/s")
    print("UDP request/response, median round trip of 3000, per round:")
    for name in dict(rtts):
        each = [f"{r:.1f}" for n, r in rtts if n == name]
        print(f"  {name:34s} {statistics.median(r for n, r in rtts if n == name):6.1f} us  ({' '.join(each)})")
    assert all(g > 0 for _, g in rows)
