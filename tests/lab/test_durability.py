"""Tier 3, "nothing acknowledged is lost": kill -9 every portmesh process of a lab, restart them, compare.

Containers and mappings are made through the CLI (so through the API, which
answered 2xx); one last mapping is added with ``--no-wait`` and the processes are
killed at once, so it was acknowledged but possibly not yet realised anywhere.
Then every portmesh process the lab recorded (the store's ``ovsdb-server``, the
controller, the API, the agents) gets SIGKILL by its recorded PID. While they are
down, the switch (``fail_mode=secure``) must keep forwarding with the flows it has.
After a restart from the recorded command lines, the API must list exactly what it
listed before (plus the last mapping), every mapping must answer from ``inet`` with
the client's real address, and the switch must hold the same flows as before.

Both datapaths (the ``datapath`` fixture). On an eBPF host the datapath is the kernel program
with its pinned maps: it keeps forwarding with every portmesh process dead (and, having no
controller to ask, refuses an unmapped port itself with a RST); after the restart its maps are
the same maps (kernel ids) holding the same entries, plus only the last mapping's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from portmesh.lab import services
from portmesh.lab.network import Lab
from portmesh.lab.ovs import wait_unix_socket
from portmesh.runtime import procs
from tests.lab.conftest import lab_suffix
from tests.lab.test_mapping_e2e import OUTSIDE_IP, Cloud, keep_logs, pytestmark, whoami_from_inet
from tests.lab.tools import t4_ebpf

__all__ = ["pytestmark"]  # the lab/root/OVS marks of the end-to-end tests apply here too

IP10, IP11 = "203.0.113.10", "203.0.113.11"
# (ip, port, container) every mapping the test makes; the last one is written with --no-wait just before the kill.
MAPPINGS = [(IP10, 80, "dweb1"), (IP10, 8080, "dweb2"), (IP11, 80, "dweb3"), (IP11, 8081, "dweb3")]
LAST = (IP10, 8081, "dweb1")
# Restarted in this order: the store first (everybody else connects to it), agents last.
PORTMESH_LABELS = ("store", "controller", "api")
COUNTERS = re.compile(r"(duration|n_packets|n_bytes|idle_age|hard_age)=[^,\s]+,?\s*")


@pytest.fixture(scope="module")
def cloud(datapath: str) -> Iterator[Cloud]:
    lab = Lab(f"qd{os.getpid() % 100000}{lab_suffix(datapath)}", say=lambda _msg: None)
    try:
        state = lab.up(hosts=1, datapath=datapath)
        c = Cloud(state)
        run(c, "dweb1", IP10, 80, listen=(80, 8081))
        run(c, "dweb2", IP10, 8080, listen=(8080,))
        run(c, "dweb3", IP11, 80, listen=(80, 8081))
        c.cli("map", "add", IP11, "8081/tcp", "dweb3")
        yield c
    finally:
        keep_logs(lab)
        lab.down()


def run(cloud: Cloud, name: str, ip: str, port: int, listen: tuple[int, ...]) -> None:
    """A container mapped on ``ip:port`` whose server also listens on ports mapped later."""
    whoami = [sys.executable, "-m", "portmesh.lab.whoami", "--name", name]
    for p in listen:
        whoami += ["--tcp", str(p)]
    cloud.cli("run", name, "--host", "h1", "--ip", ip, "--port", f"{port}/tcp", "--", *whoami)
    cloud.wait_running(name)


def portmesh_labels(cloud: Cloud) -> list[str]:
    """Every portmesh process the lab recorded (not its OVS daemons: those are the host's, not ours)."""
    recorded = [p.label for p in cloud.state.processes]
    agents = [label for label in recorded if label.startswith("agent:")]
    assert set(PORTMESH_LABELS) <= set(recorded) and agents, recorded
    return [*PORTMESH_LABELS, *agents]


def kill9(cloud: Cloud, labels: list[str]) -> None:
    """SIGKILL each recorded process group (the process leads its own session), then wait for it to be gone."""
    state = Lab(cloud.state.name).state()
    assert state is not None
    for label in labels:
        proc = state.process(label)
        assert proc is not None and procs.alive(proc.ref), f"{label} is not running before the kill"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    for label in labels:
        proc = state.process(label)
        assert proc is not None
        deadline = time.monotonic() + 5
        while procs.alive(proc.ref):
            assert time.monotonic() < deadline, f"{label} ({proc.pid}) survived SIGKILL"
            procs.reap()
            time.sleep(0.05)


def restart(cloud: Cloud, labels: list[str]) -> None:
    lab = Lab(cloud.state.name, say=lambda _msg: None)
    for label in labels:
        lab.restart(label)
        if label == "store":
            wait_unix_socket(services.store_socket(cloud.state.dir))
    services.wait_http(f"{cloud.state.api_url}/v1/status")
    new = lab.state()
    assert new is not None
    cloud.state = new


def auth(cloud: Cloud) -> dict[str, str]:
    """The lab API's bearer token header: reads need it too."""
    return {"Authorization": f"Bearer {services.token_file(cloud.state.dir).read_text().strip()}"}


def listing(cloud: Cloud) -> dict[str, Any]:
    """What the API says exists: containers (with their reported state) and mappings."""
    api = httpx.Client(base_url=cloud.state.api_url, headers=auth(cloud), timeout=10)
    containers = api.get("/v1/containers").raise_for_status().json()
    mappings = api.get("/v1/mappings").raise_for_status().json()
    hosts = [h["name"] for h in api.get("/v1/hosts").raise_for_status().json()]
    return {"containers": containers, "mappings": mappings, "hosts": hosts}


def wait_converged(cloud: Cloud, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            status = httpx.get(f"{cloud.state.api_url}/v1/status", headers=auth(cloud), timeout=5).json()
            if status.get("converged") and all(h["switch_connected"] for h in status["hosts"]):
                return status
        time.sleep(0.2)
    raise AssertionError(f"not converged within {timeout}s: {status}")


def flow_table(cloud: Cloud) -> list[str]:
    """The switch's flows without their counters and ages, sorted: what the controller installed."""
    return sorted(COUNTERS.sub("", line) for line in cloud.flows())


DURATION = re.compile(r"duration=([0-9.]+)s")


def flow_durations(cloud: Cloud) -> dict[str, float]:
    """Each flow (without counters) and how long the switch has held it: a re-sent flow starts again at 0."""
    out: dict[str, float] = {}
    for line in cloud.flows():
        found = DURATION.search(line)
        assert found, line
        out[COUNTERS.sub("", line)] = float(found.group(1))
    return out


def assert_traffic(cloud: Cloud, mappings: list[tuple[str, int, str]]) -> None:
    for ip, port, name in mappings:
        reply = whoami_from_inet(cloud, ip, port)
        assert reply["name"] == name, (ip, port, reply)
        assert reply["client"] == f"{OUTSIDE_IP}:{reply['my_port']}", "the real client address and port"
        assert reply["local"] == f"{ip}:{port}"


def test_kill9_everything_and_restart_loses_nothing(cloud: Cloud, datapath: str) -> None:
    wait_converged(cloud)
    assert_traffic(cloud, MAPPINGS)
    if datapath == "ebpf":
        kill9_on_ebpf(cloud)
        return
    flows_before = flow_table(cloud)  # before the last write: its flows may or may not be in before the kill
    held_before, clock_before = flow_durations(cloud), time.monotonic()

    # Acknowledged (2xx), not waited for: it must survive the kill that follows at once.
    written = json.loads(cloud.cli("map", "add", *LAST[:1], f"{LAST[1]}/tcp", LAST[2], "--no-wait", "-o", "json").stdout)
    assert written["mapping"]["port"] == LAST[1]
    before = listing(cloud)
    labels = portmesh_labels(cloud)
    kill9(cloud, labels)

    # Everything of ours is dead; the switch, fail-secure, keeps forwarding with what it holds.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{cloud.state.api_url}/v1/status", timeout=2)
    assert_traffic(cloud, MAPPINGS)
    # Unmapped stays unreachable (no learning-bridge fallback). It times out rather than being refused:
    # the RST for an unmapped port is the controller's answer to a packet-in, and the controller is dead.
    assert cloud.tool("inet", "tcp-refused", "--host", IP10, "--port", "9999")["outcome"] != "connected"

    restart(cloud, labels)
    wait_converged(cloud)
    after = listing(cloud)
    assert after == before, "the API lists exactly what it listed before the kill"
    assert any(m["public_ip"] == LAST[0] and m["port"] == LAST[1] for m in after["mappings"])
    assert_traffic(cloud, [*MAPPINGS, LAST])
    # The restarted controller found the switch as it left it, plus the one acknowledged change.
    flows_after = flow_table(cloud)
    assert set(flows_before) <= set(flows_after), sorted(set(flows_before) - set(flows_after))
    added = set(flows_after) - set(flows_before)
    assert added and all(str(LAST[1]) in f for f in added), sorted(added)
    # Zero flow-mods for what was unchanged: no flow held before was re-sent (re-adding restarts its duration).
    held_after, elapsed = flow_durations(cloud), time.monotonic() - clock_before
    reset = {f: (held_before[f], held_after[f]) for f in held_before if held_after[f] < held_before[f] + elapsed - 1.0}
    assert not reset, f"flows re-sent by the restarted controller (duration before, after; {elapsed:.1f} s apart): {reset}"


def kill9_on_ebpf(cloud: Cloud) -> None:
    """The eBPF branch of the test above: the same steps, with the maps where OVS has its flows."""
    entries_before, ids_before = t4_ebpf.entries(cloud.state, "h1"), t4_ebpf.map_ids(cloud.state, "h1")
    written = json.loads(cloud.cli("map", "add", *LAST[:1], f"{LAST[1]}/tcp", LAST[2], "--no-wait", "-o", "json").stdout)
    assert written["mapping"]["port"] == LAST[1]
    before = listing(cloud)
    labels = portmesh_labels(cloud)
    kill9(cloud, labels)

    # Everything of ours is dead; the program keeps forwarding with the maps it has.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{cloud.state.api_url}/v1/status", timeout=2)
    assert_traffic(cloud, MAPPINGS)
    # Unmapped stays unreachable: the program answers the SYN with a RST itself (no controller involved).
    assert cloud.tool("inet", "tcp-refused", "--host", IP10, "--port", "9999")["outcome"] == "refused"

    restart(cloud, labels)
    wait_converged(cloud)
    after = listing(cloud)
    assert after == before, "the API lists exactly what it listed before the kill"
    assert any(m["public_ip"] == LAST[0] and m["port"] == LAST[1] for m in after["mappings"])
    assert_traffic(cloud, [*MAPPINGS, LAST])
    # The restarted agent re-used the pinned maps and rewrote nothing; it only added the last mapping.
    assert t4_ebpf.map_ids(cloud.state, "h1") == ids_before, "a map was re-created"
    entries_after = t4_ebpf.entries(cloud.state, "h1")
    assert set(entries_before) <= set(entries_after), sorted(set(entries_before) - set(entries_after))
    added = set(entries_after) - set(entries_before)
    assert added and all(t4_ebpf.mapping_entry_port(e) == LAST[1] for e in added), sorted(added)


def test_restarted_system_still_takes_writes(cloud: Cloud) -> None:
    """After the restart the API, store, controller and agent work together as before."""
    cloud.cli("map", "rm", IP11, "8081/tcp")
    refused = cloud.tool("inet", "tcp-refused", "--host", IP11, "--port", "8081")
    assert refused["outcome"] == "refused", refused
    cloud.cli("map", "add", IP11, "8081/tcp", "dweb3")
    assert whoami_from_inet(cloud, IP11, 8081)["name"] == "dweb3"
