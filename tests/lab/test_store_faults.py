"""Issue 13 item 5 in a real ``--ha`` lab: kill -9 a store member while writes and traffic run.

A 2-host lab whose store is the 3-member Raft cluster ``lab up --ha`` makes. A container on h2
answers a UDP echo (and a TCP line echo) on a mapping; a probe in inet sends it 100 UDP packets
a second and keeps a TCP connection exchanging lines (tests/lab/test_faults.py's probe). A writer
thread adds mappings to a second container through the API, one after the other, and records
every write the API acknowledged (201). Then ``portmesh lab fault kill-store-member``'s own code
kills the leader (one case) or a follower (the other) with SIGKILL, times the API's write
outage, restarts the member and waits until it has rejoined. Asserted:

- every acknowledged write is in the store afterwards, read back through the API *and* directly
  from a member that survived and from the member that was killed (``ovsdb-client`` on its
  socket, not leader-only): Raft lost nothing it acknowledged;
- no probe packet was lost and the TCP connection lived (the data plane does not depend on the
  store); the probe's positive control is its readiness (every target answered before the kill);
- the API accepted writes again within 10 s (measured twice: by the fault's own probe write and
  as the writer's longest gap between acknowledgements around the kill; both printed);
- the killed member is a cluster member again, following the leader.

Both datapaths (the ``datapath`` fixture): nothing asserted reads the switch, and on eBPF hosts
the data plane (the program and its pinned maps) does not depend on the store either.

Reproduce: ``.venv/bin/python -m pytest -q -s tests/lab/test_store_faults.py`` (figures printed),
or by hand: ``portmesh lab up --ha; portmesh lab fault kill-store-member leader``.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from portmesh.lab import faults, ha, services
from portmesh.lab.network import Lab
from portmesh.lab.state import LabState
from tests.lab.conftest import lab_suffix
from tests.lab.test_faults import ECHO, PPS, PROBE, TCP_PORT, UDP_PORT

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(shutil.which("ovs-vswitchd") is None, reason="openvswitch-switch is not installed"),
]

ECHO_IP = "203.0.113.50"  # container sfe on h2: the probe's target
WRITE_IP = "203.0.113.51"  # container sfw on h1: the writer's mappings go to it
MAX_OUTAGE_S = 10.0


class Probe:
    """The probe process in inet: UDP at 100 pps and one TCP echo to ECHO_IP, until a line on its stdin."""

    def __init__(self, state: LabState) -> None:
        argv = ["ip", "netns", "exec", state.ns("inet"), sys.executable, "-c", PROBE, ECHO_IP, str(UDP_PORT), str(TCP_PORT),
                str(PPS)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            self.kill()
            raise AssertionError(f"probe not ready within 30 s (got {line!r})")

    def finish(self) -> dict[str, Any]:
        out, _ = self.proc.communicate("stop\n", timeout=40)
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Writer(threading.Thread):
    """Adds mappings WRITE_IP:port/udp -> sfw one after the other; records each one the API acknowledged."""

    def __init__(self, state: LabState, first_port: int) -> None:
        super().__init__(daemon=True)
        token = services.token_file(state.dir).read_text().strip()
        self.http = httpx.Client(base_url=state.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=15)
        self.port = first_port
        self.acked: list[tuple[int, float]] = []  # (port, monotonic time of the 201)
        self.failed: list[str] = []  # answers other than 201 (errors while the store had no leader)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            body = {"public_ip": WRITE_IP, "port": self.port, "proto": "udp", "container": "sfw"}
            try:
                reply = self.http.post("/v1/mappings", json=body)
                if reply.status_code in (200, 201):
                    self.acked.append((self.port, time.monotonic()))
                else:
                    self.failed.append(f"{reply.status_code} {reply.text[:120]}")
            except httpx.HTTPError as exc:
                self.failed.append(repr(exc))
            self.port += 1  # an unacknowledged write may or may not have landed: never reused
            time.sleep(0.01)

    def wait_acks(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        target = len(self.acked) + count
        while len(self.acked) < target:
            assert self.is_alive() and time.monotonic() < deadline, f"writer stalled: {self.failed[-3:]}"
            time.sleep(0.02)

    def halt(self) -> None:
        self.stop.set()
        self.join(30)
        self.http.close()

    def longest_gap_around(self, t: float) -> float:
        """The longest time between two acknowledgements, from the last one before ``t`` on."""
        times = [at for _, at in self.acked]
        before = [at for at in times if at <= t]
        start = before[-1] if before else t
        later = [start] + [at for at in times if at > start]
        return max(b - a for a, b in itertools.pairwise(later)) if len(later) > 1 else float("inf")


def member_mappings(state: LabState, member: int) -> set[tuple[str, str, int]]:
    """The Mapping rows as member ``member`` holds them (its own socket, not redirected to the leader)."""
    query = json.dumps([services.STORE_DB_NAME, {"op": "select", "table": "Mapping", "where": []}])
    out = subprocess.run(
        ["ovsdb-client", "--no-leader-only", "transact", f"unix:{services.member_socket(state.dir, member)}", query],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    rows = json.loads(out)[0]["rows"]
    return {(r["public_ip"], r["proto"], int(r["port"])) for r in rows}


@pytest.fixture(scope="module")
def lab(datapath: str) -> Iterator[Lab]:
    lab = Lab(f"sf{os.getpid() % 10000}{lab_suffix(datapath)}", say=lambda msg: None)
    try:
        state = lab.up(2, ha=True, datapath=datapath)
        token = services.token_file(state.dir).read_text().strip()
        with httpx.Client(base_url=state.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as api:
            echo = {"name": "sfe", "host": "h2", "ips": [ECHO_IP], "command": [sys.executable, "-c", ECHO],
                    "ports": [{"port": UDP_PORT, "proto": "udp"}, {"port": TCP_PORT}]}
            writes = {"name": "sfw", "host": "h1", "ips": [WRITE_IP], "command": ["sleep", "3600"]}
            for body in (echo, writes):
                reply = api.post("/v1/containers", params={"wait": "true"}, json=body)
                assert reply.status_code == 201, reply.text
        yield lab
    finally:
        lab.down()


@pytest.mark.parametrize("which", ["leader", "follower"])
def test_killing_a_store_member_loses_no_acknowledged_write_and_no_packet(lab: Lab, which: str) -> None:
    state = lab.state()
    assert state is not None
    lead = ha.wait_formed(state)
    member = lead if which == "leader" else next(n for n in (1, 2, 3) if n != lead)
    survivor = next(n for n in (1, 2, 3) if n != member)
    probe = Probe(state)
    writer = Writer(state, 20000 if which == "leader" else 30000)
    try:
        writer.start()
        writer.wait_acks(20)  # writes flow before the fault
        t_kill = time.monotonic()
        report = faults.kill_store_member(lab, "leader" if which == "leader" else str(member))
        writer.wait_acks(20)  # and after it
    finally:
        writer.halt()
        result = probe.finish() if probe.proc.poll() is None else {}
        probe.kill()
    outage = report.details["API write accepted again"]
    gap = writer.longest_gap_around(t_kill)
    elected = report.details.get("new leader elected")
    print(f"\nstore-{member} ({which}) kill -9: API write accepted again {outage:.2f} s after the kill "
          f"(writer's longest gap {gap:.2f} s), " + (f"new leader {elected:.2f} s, " if elected is not None else "")
          + f"rejoined {report.back_s:.2f} s after its restart; {len(writer.acked)} writes acknowledged, "
          f"{len(writer.failed)} refused or failed meanwhile; {report.notes}")

    assert report.target == f"store-{member}"
    assert outage <= MAX_OUTAGE_S and gap <= MAX_OUTAGE_S, (outage, gap)
    if which == "leader":
        assert "was the leader" in report.notes[0], report.notes
    st = ha.member_status(state.dir, member)
    assert st.member_of_cluster and st.role in ("follower", "leader"), st

    target = result["targets"][ECHO_IP]
    assert target["sent"] > 0 and not target["lost"], target  # the data plane never needed the store
    assert not target["tcp_error"] and target["tcp_echoed"] > 0, target

    acked = {(WRITE_IP, "udp", port) for port, _ in writer.acked}
    token = services.token_file(state.dir).read_text().strip()
    with httpx.Client(base_url=state.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as api:
        listed = {(m["public_ip"], m["proto"], int(m["port"])) for m in api.get("/v1/mappings").json()}
    assert acked <= listed, sorted(acked - listed)[:10]
    assert (ECHO_IP, "udp", UDP_PORT) in listed  # the read-back sees what was there before (control)
    deadline = time.monotonic() + 10  # a follower applies what the leader committed a moment later
    for n in (survivor, member):
        while not acked <= (held := member_mappings(state, n)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert acked <= held, (n, sorted(acked - held)[:10])
