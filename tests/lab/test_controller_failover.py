"""Issue 13 item 6 in a real ``--ha`` lab: the master controller dies while traffic runs.

A 2-host lab from ``lab up --ha`` (3-member Raft store, controller-1 and controller-2, every
switch connected to both with OpenFlow 1.3 roles). One container per host answers a UDP echo and
a TCP line echo on a mapping; tests/lab/test_faults.py's probe in inet sends 100 UDP packets a
second to both mappings and keeps one TCP connection per mapping exchanging a line every 50 ms.
Once the probe has answers from both, ``portmesh lab fault kill-controller``'s own code kills the
master (SIGKILL, then in the second case SIGTERM) and restarts it. Asserted:

- the other controller says ``became master`` within 2 s of the signal (printed);
- no probe packet lost, both TCP connections alive (positive control: the probe's readiness,
  and the number of packets it sent through the fault);
- no flow churn: zero flow-mods in either controller's log, and every flow on every switch is
  older than the kill (the switches' own flow durations);
- the switches agree: each has exactly one master and one slave connection afterwards
  (``ovs-vsctl list controller``), and the killed controller came back as the standby;
- the new master programs: a container created after the failover answers inet (positive
  control for "the new master does nothing").

Reproduce: ``.venv/bin/python -m pytest -q -s tests/lab/test_controller_failover.py``, or by hand:
``portmesh lab up --ha; portmesh lab fault kill-controller`` (the master by default).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from portmesh.lab import faults, node, services
from portmesh.lab.network import Lab, ovs_of
from portmesh.lab.state import LabState
from tests.lab.test_faults import ECHO, PPS, TCP_PORT, UDP_ONCE, UDP_PORT, Probe

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(shutil.which("ovs-vswitchd") is None, reason="openvswitch-switch is not installed"),
]

TARGETS = {"f1": ("h1", "203.0.113.60"), "f2": ("h2", "203.0.113.61")}
TAKEOVER_S = 2.0


def api_client(state: LabState) -> httpx.Client:
    token = services.token_file(state.dir).read_text().strip()
    return httpx.Client(base_url=state.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(f"fo{os.getpid() % 10000}", say=lambda msg: None)
    try:
        state = lab.up(2, ha=True)
        with api_client(state) as api:
            for name, (host, ip) in TARGETS.items():
                body = {"name": name, "host": host, "ips": [ip], "command": [sys.executable, "-c", ECHO],
                        "ports": [{"port": UDP_PORT, "proto": "udp"}, {"port": TCP_PORT}]}
                reply = api.post("/v1/containers", params={"wait": "true"}, json=body)
                assert reply.status_code == 201, reply.text
        yield lab
    finally:
        lab.down()


def flow_ages(state: LabState, host: str) -> list[float]:
    """The age (s) of every flow on ``host``'s br0, from the switch itself."""
    ovs = ovs_of(state, host)
    out = node.run(["ovs-ofctl", "-O", "OpenFlow13", "dump-flows", "br0"], netns=ovs.netns, env=ovs.env()).stdout
    return [float(m) for m in re.findall(r"duration=([0-9.]+)s", out)]


def switch_roles(state: LabState, host: str) -> list[str]:
    """The role each of br0's controller connections has, as the switch sees it (sorted)."""
    ovs = ovs_of(state, host)
    out = node.run(["ovs-vsctl", "--bare", "--columns=role", "list", "controller"], netns=ovs.netns, env=ovs.env()).stdout
    return sorted(out.split())


def wait_roles(state: LabState, timeout: float = 30.0) -> dict[str, list[str]]:
    """Until every switch has one master and one slave connection (the restarted controller reconnects)."""
    deadline = time.monotonic() + timeout
    while True:
        roles = {h: switch_roles(state, h) for h in state.hosts}
        if all(r == ["master", "slave"] for r in roles.values()):
            return roles
        if time.monotonic() > deadline:
            raise AssertionError(f"switch roles not one master + one slave within {timeout:.0f} s: {roles}")
        time.sleep(0.1)


def logs_of(state: LabState) -> dict[str, tuple[Path, int]]:
    out = {}
    for proc in faults.controllers(state):
        path = Path(proc.log)
        out[proc.label] = (path, path.stat().st_size)
    return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "graceful"])
def test_master_controller_failover_loses_nothing_and_changes_no_flow(lab: Lab, sig: signal.Signals) -> None:
    state = lab.state()
    assert state is not None
    wait_roles(state)
    probe = Probe(state, [ip for _, ip in TARGETS.values()])
    try:
        logs = logs_of(state)
        flows_before = {h: len(flow_ages(state, h)) for h in state.hosts}
        killed_at = time.monotonic()
        report = faults.kill_controller(lab, sig, which="master")
        time.sleep(1.0)  # a window of traffic after the takeover (a measurement window, not readiness)
        result = probe.finish()
    finally:
        probe.kill()
    print(f"\nkill-controller master {sig.name}: {json.dumps(report.to_dict())}")

    takeover = [secs for what, secs in report.details.items() if what.endswith("became master")]
    assert takeover and takeover[0] <= TAKEOVER_S, report.details
    # Positive control: the probe ran through the whole fault (CLOCK_MONOTONIC is one clock for every process).
    sent_from, sent_to = result["t0"] + result["first"] / PPS, result["t0"] + result["last"] / PPS
    assert sent_from < killed_at and sent_to > killed_at + takeover[0] + 0.5, (sent_from, killed_at, sent_to)
    for ip, t in result["targets"].items():
        assert t["lost"] == [], f"{ip}: {len(t['lost'])} of {t['sent']} probe packets lost"
        assert t["tcp_error"] == "" and t["tcp_echoed"] > 20, (ip, t)
    since = "".join(path.read_bytes()[offset:].decode(errors="replace") for path, offset in logs.values())
    assert report.flow_mods == 0 and faults.flow_mods_in(since) == 0, since
    age = time.monotonic() - killed_at
    for host in state.hosts:  # every flow is older than the kill: none was re-added
        ages = flow_ages(state, host)
        assert len(ages) == flows_before[host] and min(ages) >= age - 0.5, (host, age, sorted(ages)[:3])
    wait_roles(state)
    assert any(what.endswith("back as standby") for what in report.details), report.details

    # Positive control: the new master programs the switches (a container made now answers inet).
    name, ip = f"fn{sig.value}", f"203.0.113.{62 + sig.value % 10}"
    with api_client(state) as api:
        body = {"name": name, "host": "h2", "ips": [ip], "command": [sys.executable, "-c", ECHO],
                "ports": [{"port": UDP_PORT, "proto": "udp"}]}
        reply = api.post("/v1/containers", params={"wait": "true"}, json=body)
        assert reply.status_code == 201, reply.text
        try:
            udp = [sys.executable, "-c", UDP_ONCE, ip, str(UDP_PORT)]
            deadline = time.monotonic() + 10
            while node.run(udp, netns=state.ns("inet"), check=False).stdout.strip() != "ok":
                assert time.monotonic() < deadline, f"{name} did not answer within 10 s of its create after the failover"
        finally:
            api.delete(f"/v1/containers/{name}", params={"wait": "true"})
