"""Issue 15's counters on an eBPF host, in a real 1-host lab (h1, the gateway, runs the eBPF datapath).

No switch for the master controller to read: h1's agent reads its maps and reports into its Host
row (schema 1.8.0), and the API / ``portmesh map inspect`` show the sum. Two outside clients: A
(inet's own address) and B (198.51.100.78, added to inet's eth0 by this test). Container w1 on h1
holds 203.0.113.42 and serves UDP:

    .42:55/udp  allow A     filtered: counted; what A and B sent shows exactly in the API and the CLI
    .42:56/udp  no policy   plain: served, counted in the maps, never reported (as OVS does not count it)
    .42:57/udp  (unmapped)  refused: the host's drop report counts exactly what was sent
    .42:58/udp  w1 + w2     balanced (w2 on h1 too): counted and reported exactly

And a mixed 2-host lab (h1 OVS gateway, h2 eBPF): what enters at h1 (the master's OVS count) and
what a container on h2 sends to the public address (h2's report) add up exactly in the API.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import httpx
import pytest

from portmesh.agent.ebpf import layout, loader
from portmesh.agent.ebpf import sync as ebpf_sync
from portmesh.lab import node, services
from portmesh.lab.network import INET_IP, Lab, bpf_dir
from portmesh.lab.state import LabState
from portmesh.model.entities import MappingCounters, MappingKey, Proto
from portmesh.store.client import Store
from tests.lab.test_mapping_e2e import keep_logs
from tests.lab.test_multihost import wait_for

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(shutil.which("clang") is None, reason="clang is not installed (the eBPF datapath is built)"),
]

LB = str(Path(__file__).parent / "tools" / "lbtools.py")
PORTMESH = str(Path(sys.executable).parent / "portmesh")
VIP = "203.0.113.42"
A, B = INET_IP, "198.51.100.78"
SIZE = 100  # payload bytes: each datagram is a 142-byte frame (14 Ethernet + 20 IP + 8 UDP + 100)
FRAME = 14 + 20 + 8 + SIZE
FILTERED = MappingKey(IPv4Address(VIP), Proto.UDP, 55)
PLAIN = MappingKey(IPv4Address(VIP), Proto.UDP, 56)
ZERO = {"allowed_packets": 0, "allowed_bytes": 0, "denied_packets": 0, "denied_bytes": 0}


class Cloud:
    def __init__(self, lab: Lab, state: LabState) -> None:
        self.lab, self.state = lab, state
        token = services.token_file(state.dir).read_text().strip()
        self.api = httpx.Client(base_url=state.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        self.store = Store(services.store_remote(state.dir), timeout=10)

    def ns(self, where: str) -> str:
        return self.lab.netns_of(where)

    def map(self, port: int, **policy: list[str]) -> None:
        body = {"public_ip": VIP, "proto": "udp", "port": port, "container": "w1", **policy}
        reply = self.api.post("/v1/mappings", params={"wait": "true"}, json=body)
        assert reply.status_code == 201, reply.text

    def stream(self, source: str, port: int, count: int) -> dict[str, Any]:
        args = ("udp-stream", "--host", VIP, "--port", str(port), "--bind", source, "--count", str(count),
                "--every", "0.001", "--size", str(SIZE), "--wait", "1")
        out = node.run([sys.executable, LB, *args], netns=self.ns("inet"), check=True, timeout=60).stdout
        result: dict[str, Any] = json.loads(out)
        return result

    def maps(self) -> dict[str, loader.BpfMap]:
        pin = bpf_dir(self.state, "h1")
        return {name: loader.open_map(pin, name) for name in (ebpf_sync.STATS, ebpf_sync.DENIED, "drops")}


@pytest.fixture(scope="module")
def cloud() -> Iterator[Cloud]:
    lab = Lab(f"ect{os.getpid() % 10000}", say=lambda _msg: None)
    try:
        state = lab.up(hosts=1, tune_rmem=False, datapath="ebpf")
        assert state.api_url, "the lab came up without an API"
        c = Cloud(lab, state)
        c.store.start()
        node.run(["ip", "addr", "add", f"{B}/24", "dev", "eth0"], netns=c.ns("inet"))
        for name, ports in (("w1", ("55", "56", "57", "58")), ("w2", ("58",))):
            command = [sys.executable, LB, "serve", "--name", name, *(a for p in ports for a in ("--udp", p))]
            body = {"name": name, "host": "h1", "ips": [VIP], "ports": [], "command": command}
            reply = c.api.post("/v1/containers", params={"wait": "true"}, json=body)
            assert reply.status_code == 201, reply.text
            wait_for(f"{name} listening", lambda n=name: node.run(["ss", "-Hlun", "sport = :58"], netns=c.ns(n)).stdout.strip())
        c.map(55, allow=[f"{A}/32"])
        c.map(56)
        reply = c.api.post("/v1/mappings", params={"wait": "true"},
                           json={"public_ip": VIP, "proto": "udp", "port": 58, "backends": ["w1", "w2"]})
        assert reply.status_code == 201, reply.text
        try:
            yield c
        finally:
            c.store.close()
    finally:
        keep_logs(lab)
        lab.down()


def test_the_api_and_map_inspect_show_exactly_what_was_sent(cloud: Cloud) -> None:
    sent_a, sent_b = cloud.stream(A, 55, 300), cloud.stream(B, 55, 120)
    assert sent_a["answered"] == 300 and sent_b["answered"] == 0, (sent_a, sent_b)  # the policy holds
    plain = cloud.stream(A, 56, 50)
    assert plain["answered"] == 50, plain
    want = {"allowed_packets": 300, "allowed_bytes": 300 * FRAME, "denied_packets": 120, "denied_bytes": 120 * FRAME}

    def counted() -> dict[str, int] | None:
        got: dict[str, int] = cloud.api.get(f"/v1/mappings/{VIP}/udp/55").json().get("counters") or {}
        return got if got.get("allowed_packets", 0) >= 300 and got.get("denied_packets", 0) >= 120 else None

    counters = wait_for("h1's counters in the API", counted, timeout=30)
    print(f"counters in the API: {counters}; sent A 300, B 120 x {FRAME} B")
    assert counters == want  # exactly: no other packet of this module reaches port 55
    env = {**os.environ, "PORTMESH_API": str(cloud.state.api_url),
           "PORTMESH_TOKEN_FILE": str(services.token_file(cloud.state.dir))}
    shown = subprocess.run([PORTMESH, "map", "inspect", VIP, "55/udp"], env=env, capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    numbers = {int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", shown.stdout)}
    assert set(want.values()) <= numbers, shown.stdout
    # The plain mapping: served and counted by the program (the control), but not reported, as on OVS.
    maps = cloud.maps()
    try:
        assert ebpf_sync.read_counters(maps, PLAIN) == (50, 50 * FRAME)
    finally:
        for m in maps.values():
            m.close()
    reported = cloud.store.host_counters("h1")
    assert reported[str(FILTERED)] == MappingCounters(**want) and str(PLAIN) not in reported, reported
    assert cloud.api.get(f"/v1/mappings/{VIP}/udp/56").json().get("counters") == ZERO


def test_a_balanced_mappings_counters_reach_the_api_exactly(cloud: Cloud) -> None:
    assert cloud.api.get(f"/v1/mappings/{VIP}/udp/58").json().get("counters") == ZERO  # nothing sent yet
    sent = cloud.stream(A, 58, 200)
    assert sent["answered"] == 200, sent
    want = {**ZERO, "allowed_packets": 200, "allowed_bytes": 200 * FRAME}

    def counted() -> dict[str, int] | None:
        got: dict[str, int] = cloud.api.get(f"/v1/mappings/{VIP}/udp/58").json().get("counters") or {}
        return got if got.get("allowed_packets", 0) >= 200 else None

    assert wait_for("the balanced mapping's counters in the API", counted, timeout=30) == want


def test_the_hosts_drop_report_counts_the_refused_packets(cloud: Cloud) -> None:
    maps = cloud.maps()
    try:
        before = ebpf_sync.read_drops(maps)[layout.DropReason.REFUSED][0]
    finally:
        for m in maps.values():
            m.close()
    # The report catches up with the maps first (they may hold refusals from before this test).
    wait_for("the report at the maps' count", lambda: cloud.store.host_drops("h1").get("refused", 0) == before, timeout=30)
    sent = cloud.stream(A, 57, 40)  # w1 listens on 57, but nothing maps it: refused by the program
    assert sent["answered"] == 0, sent
    wait_for("40 more refused in h1's report",
             lambda: cloud.store.host_drops("h1").get("refused", 0) >= before + 40, timeout=30)
    assert cloud.store.host_drops("h1")["refused"] == before + 40
    assert cloud.api.get("/v1/hosts/h1").json()["drops"]["refused"] == before + 40  # the API shows it
    env = {**os.environ, "PORTMESH_API": str(cloud.state.api_url),
           "PORTMESH_TOKEN_FILE": str(services.token_file(cloud.state.dir))}
    shown = subprocess.run([PORTMESH, "hosts"], env=env, capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert f"refused={before + 40}" in shown.stdout, shown.stdout


@pytest.fixture(scope="module")
def mixed() -> Iterator[Cloud]:
    """h1 (the gateway) on OVS, h2 on eBPF: w1, w2 on h1 behind .42:58/udp; client c2 on h2 (.43)."""
    if shutil.which("ovs-vswitchd") is None:
        pytest.skip("openvswitch-switch is not installed")
    lab = Lab(f"ecm{os.getpid() % 10000}", say=lambda _msg: None)
    try:
        state = lab.up(hosts=2, tune_rmem=False, datapath="h2=ebpf")
        assert state.api_url, "the lab came up without an API"
        c = Cloud(lab, state)
        c.store.start()
        for name, host, ip in (("w1", "h1", VIP), ("w2", "h1", VIP), ("c2", "h2", "203.0.113.43")):
            command = [sys.executable, LB, "serve", "--name", name, "--udp", "58"]
            body = {"name": name, "host": host, "ips": [ip], "ports": [], "command": command}
            reply = c.api.post("/v1/containers", params={"wait": "true"}, json=body)
            assert reply.status_code == 201, reply.text
            wait_for(f"{name} listening", lambda n=name: node.run(["ss", "-Hlun", "sport = :58"], netns=c.ns(n)).stdout.strip())
        reply = c.api.post("/v1/mappings", params={"wait": "true"},
                           json={"public_ip": VIP, "proto": "udp", "port": 58, "backends": ["w1", "w2"]})
        assert reply.status_code == 201, reply.text
        try:
            yield c
        finally:
            c.store.close()
    finally:
        keep_logs(lab)
        lab.down()


def test_a_mixed_cloud_shows_the_switches_and_the_ebpf_hosts_counts_summed(mixed: Cloud) -> None:
    """200 datagrams enter at h1 (OVS: the master counts them from the switch), 100 at h2 (eBPF: c2 to
    the public address, counted by h2's program, then tunnelled to h1 and not counted again)."""
    from_inet = mixed.stream(A, 58, 200)
    assert from_inet["answered"] == 200, from_inet
    args = ("udp-stream", "--host", VIP, "--port", "58", "--count", "100", "--every", "0.001",
            "--size", str(SIZE), "--wait", "1")
    out = node.run([sys.executable, LB, *args], netns=mixed.ns("c2"), check=True, timeout=60).stdout
    from_c2 = json.loads(out)
    assert from_c2["answered"] == 100, from_c2
    key = MappingKey(IPv4Address(VIP), Proto.UDP, 58)
    want = {**ZERO, "allowed_packets": 300, "allowed_bytes": 300 * FRAME}

    def counted() -> dict[str, int] | None:
        got: dict[str, int] = mixed.api.get(f"/v1/mappings/{VIP}/udp/58").json().get("counters") or {}
        return got if got.get("allowed_packets", 0) >= 300 else None

    counters = wait_for("both halves in the API", counted, timeout=30)
    print(f"mixed cloud: API {counters}; h2's report {mixed.store.host_counters('h2').get(str(key))}")
    assert counters == want
    assert mixed.store.host_counters("h2")[str(key)] == MappingCounters(100, 100 * FRAME, 0, 0)  # h2's half
