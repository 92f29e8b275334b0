"""Issue 15, health checks: the agent checks each backend from inside the backend's own namespace
and reports ``up`` / ``down: <reason>`` to the store within ``interval * threshold + timeout``.

One real 1-host lab (named uniquely, always taken down). Mappings are made through the API
(``POST /v1/mappings`` with ``backends`` and ``health``); the verdicts are read from the store,
where the agent writes them (``Store.mapping_health``), polled every 20 ms from the store's local
replica, so a measured time is the agent's, not the API's.

    203.0.113.40:80   w1 (tools/lbtools.py serve on 0.0.0.0:80, its control port stops/starts it)
                      tcp check, interval 1 s, timeout 0.5 s, threshold 2
    203.0.113.41:80   w2, http check on port 8000: a web server bound to 203.0.113.41 only, and
                      8000 not mapped: nothing outside w2's namespace can reach it (checked)
    203.0.113.41:81   w2, tcp check on port 8001: a listener on 127.0.0.1 only, so a check of the
                      public IP is refused there (the negative next to the positive above)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import httpx
import pytest

from portmesh.lab import faults, node, services
from portmesh.lab.network import Lab
from portmesh.lab.state import LabState
from portmesh.model.entities import MappingKey, Proto
from portmesh.store.client import Store
from tests.lab.conftest import lab_suffix
from tests.lab.test_mapping_e2e import keep_logs
from tests.lab.test_multihost import wait_for

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(shutil.which("ovs-vswitchd") is None, reason="openvswitch-switch is not installed"),
]

LB = str(Path(__file__).parent / "tools" / "lbtools.py")
IP_TCP, IP_HTTP = "203.0.113.40", "203.0.113.41"
CONTROL = 9000
INTERVAL, TIMEOUT, THRESHOLD = 1.0, 0.5, 2
BOUND = INTERVAL * THRESHOLD + TIMEOUT  # the agreed detection bound, reached by the checks themselves
# ... which the verdict then takes to reach the store and this test: the agent's write (one OVSDB
# transaction), the update to this replica, the 20 ms poll, timer jitter on a loaded 2-core box. The
# worst case of the checks is the bound exactly (a hang starting right after a good check: failures
# at interval and 2*interval, the second known at 2*interval + timeout), so the write shows on top.
REPORT_SLACK = 0.2
TCP_CHECK = {"kind": "tcp", "interval": INTERVAL, "timeout": TIMEOUT, "threshold": THRESHOLD}
ROUNDS = 3

# w2's command: an HTTP server on the public IP only (port 8000) and a TCP listener on 127.0.0.1 only (8001).
W2 = f"""
import http.server, socket, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/ready" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
lo = socket.socket()
lo.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lo.bind(("127.0.0.1", 8001))
lo.listen(16)
threading.Thread(target=lambda: [lo.accept()[0].close() for _ in iter(int, 1)], daemon=True).start()
http.server.ThreadingHTTPServer(("{IP_HTTP}", 8000), H).serve_forever()
"""


def key(ip: str, port: int) -> MappingKey:
    return MappingKey(IPv4Address(ip), Proto.TCP, port)


class HcCloud:
    def __init__(self, lab: Lab, state: LabState) -> None:
        self.lab, self.state = lab, state
        token = services.token_file(state.dir).read_text().strip()
        self.api = httpx.Client(base_url=state.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        self.store = Store(services.store_remote(state.dir))
        self.store.start()

    def close(self) -> None:
        self.store.close()
        self.api.close()

    def run(self, name: str, ip: str, command: list[str], listening: int) -> None:
        body = {"name": name, "host": "h1", "ips": [ip], "ports": [], "command": command}
        reply = self.api.post("/v1/containers", params={"wait": "true"}, json=body)
        assert reply.status_code == 201, reply.text
        wait_for(f"{name} running", lambda: (self.api.get(f"/v1/containers/{name}").json().get("status") or {})
                 .get("state") == "running")
        wait_for(f"{name} listening", lambda: self.sh(name, "ss", "-Hltn", f"sport = :{listening}").strip())

    def map(self, ip: str, port: int, backends: list[str], health: dict[str, Any]) -> None:
        body = {"public_ip": ip, "proto": "tcp", "port": port, "backends": backends, "health": health}
        reply = self.api.post("/v1/mappings", params={"wait": "true"}, json=body)
        assert reply.status_code == 201, reply.text

    def health(self, k: MappingKey) -> dict[str, str]:
        return self.store.mapping_health(k)

    def until(self, k: MappingKey, backend: str, prefix: str, timeout: float = 20.0) -> tuple[float, str]:
        """Poll the store's replica every 20 ms until ``backend``'s verdict starts with ``prefix``."""
        found: tuple[float, str] = wait_for(
            f"{k} {backend} {prefix}",
            lambda: (time.monotonic(), v) if (v := self.health(k).get(backend, "")).startswith(prefix) else None,
            timeout, every=0.02)
        return found

    def ns(self, where: str) -> str:
        return self.lab.netns_of(where)

    def sh(self, where: str, *argv: str, check: bool = True) -> str:
        return node.run(argv, netns=self.ns(where), check=check).stdout

    def tool(self, where: str, *args: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(node.run([sys.executable, LB, *args], netns=self.ns(where), check=True,
                                                  timeout=60).stdout)
        return out

    def agent_log(self) -> str:
        logs = sorted((self.state.dir / "logs").glob("*agent*"))
        return "".join(p.read_text(errors="replace") for p in logs)


@pytest.fixture(scope="module")
def cloud(datapath: str) -> Iterator[HcCloud]:
    lab = Lab(f"hc{os.getpid() % 10000}{lab_suffix(datapath)}", say=lambda _msg: None)
    c: HcCloud | None = None
    try:
        state = lab.up(hosts=1, datapath=datapath)
        assert state.api_url, "the lab came up without an API"
        c = HcCloud(lab, state)
        c.run("w1", IP_TCP, [sys.executable, LB, "serve", "--name", "w1", "--tcp", "80", "--control", str(CONTROL)], 80)
        c.run("w2", IP_HTTP, [sys.executable, "-c", W2], 8000)
        c.map(IP_TCP, 80, ["w1"], TCP_CHECK)
        yield c
    finally:
        if c is not None:
            c.close()
        keep_logs(lab)
        lab.down()


def test_the_check_runs_inside_the_backends_namespace(cloud: HcCloud) -> None:
    http_check = {"kind": "http", "port": 8000, "path": "/ready", "expect": 200, "interval": INTERVAL,
                  "timeout": TIMEOUT, "threshold": THRESHOLD}
    cloud.map(IP_HTTP, 80, ["w2"], http_check)
    cloud.map(IP_HTTP, 81, ["w2"], {**TCP_CHECK, "port": 8001})
    # Positive: the web server bound to the public IP only, on a port the switch does not map, is up.
    cloud.until(key(IP_HTTP, 80), "w2", "up")
    # Negative next to it: the check goes to the public IP, not to loopback, so 127.0.0.1:8001 is refused.
    _, verdict = cloud.until(key(IP_HTTP, 81), "w2", "down")
    assert verdict == "down: connection refused"
    # Neither the agent's own namespace (the host's), nor inet, nor w2 itself connecting from its public
    # IP (that goes out to the switch) reaches 203.0.113.41:8000: only a check made inside w2's
    # namespace over the local path can have seen it up.
    for where in ("h1", "inet", "w2"):
        outcome = cloud.tool(where, "probe", "--host", IP_HTTP, "--port", "8000", "--timeout", "1")["outcome"]
        assert outcome != "connected", (where, outcome)
    # Positive controls: the same tool from inet reaches a mapped port; inside w2, from 127.0.0.1 (the
    # check's local path), the web server answers.
    assert cloud.tool("inet", "probe", "--host", IP_TCP, "--port", "80", "--timeout", "2")["outcome"] == "connected"
    fetch = (f"import http.client as h; c = h.HTTPConnection('{IP_HTTP}', 8000, timeout=2, "
             "source_address=('127.0.0.1', 0)); c.request('GET', '/ready'); print(c.getresponse().status)")
    assert cloud.sh("w2", sys.executable, "-c", fetch).strip() == "200"
    # An HTTP check expecting another status reports the one it got.
    reply = cloud.api.patch(f"/v1/mappings/{IP_HTTP}/tcp/80", params={"wait": "true"},
                            json={"health": {**http_check, "path": "/other"}})
    assert reply.status_code == 200, reply.text
    _, verdict = cloud.until(key(IP_HTTP, 80), "w2", "down")
    assert verdict == "down: HTTP 404"


def test_a_stopped_service_is_down_within_the_bound_and_up_again(cloud: HcCloud) -> None:
    k = key(IP_TCP, 80)
    cloud.until(k, "w1", "up")
    # Measured from the moment the control command returned (the listener is closed by then; the
    # command's own start, ~0.1 s of Python before, is the conservative end used for the bound).
    downs: list[float] = []
    ups: list[float] = []
    for _ in range(ROUNDS):
        before = time.monotonic()
        assert cloud.tool("w1", "ctl", "--control", str(CONTROL), "down", "80")["answer"] == "ok []"
        stopped = time.monotonic()
        at, verdict = cloud.until(k, "w1", "down")
        assert verdict == "down: connection refused"
        assert at - before <= BOUND + REPORT_SLACK, at - before
        downs.append(at - stopped)
        before = time.monotonic()
        assert cloud.tool("w1", "ctl", "--control", str(CONTROL), "up", "80")["answer"] == "ok [80]"
        started = time.monotonic()
        at, _ = cloud.until(k, "w1", "up")
        assert at - before <= BOUND + REPORT_SLACK, at - before
        ups.append(at - started)
    print(f"\nhealth: interval {INTERVAL} s, threshold {THRESHOLD}, timeout {TIMEOUT} s (bound {BOUND} s); "
          f"down detected after {', '.join(f'{d:.2f}' for d in downs)} s (median {statistics.median(downs):.2f}), "
          f"up again after {', '.join(f'{u:.2f}' for u in ups)} s (median {statistics.median(ups):.2f})")


def test_a_stopped_container_is_down_not_running_and_checks_of_a_removed_mapping_stop(cloud: HcCloud) -> None:
    k = key(IP_TCP, 80)
    cloud.until(k, "w1", "up")
    reply = cloud.api.post("/v1/containers/w1/stop", params={"wait": "true"})
    assert reply.status_code == 200, reply.text
    stopped = time.monotonic()
    at, verdict = cloud.until(k, "w1", "down")
    assert verdict == "down: not running"
    assert at - stopped <= INTERVAL + TIMEOUT + 0.5, at - stopped  # at its next check, no streak needed
    reply = cloud.api.post("/v1/containers/w1/start", params={"wait": "true"})
    assert reply.status_code == 200, reply.text
    cloud.until(k, "w1", "up")
    # The mapping goes: its check stops at once (the agent logs it), and nothing reports it again.
    assert cloud.api.delete(f"/v1/mappings/{IP_TCP}/tcp/80", params={"wait": "true"}).status_code in (200, 204)
    line = f"health check of {IP_TCP}:80/tcp backend w1 stopped"
    wait_for("the agent stopping the check", lambda: line in cloud.agent_log(), timeout=2)
    assert cloud.health(k) == {}


def test_a_hung_service_is_down_by_timeout_within_the_bound(cloud: HcCloud) -> None:
    """w2's process stopped (SIGSTOP): the kernel still completes connects, nobody answers the GET,
    so each check takes its whole timeout: the bound's ``+ timeout`` term. SIGCONT brings it back."""
    k = key(IP_HTTP, 82)
    cloud.map(IP_HTTP, 82, ["w2"], {"kind": "http", "port": 8000, "path": "/ready", "interval": INTERVAL,
                                    "timeout": TIMEOUT, "threshold": THRESHOLD})
    cloud.until(k, "w2", "up")
    pid = cloud.api.get("/v1/containers/w2").json()["status"]["pid"]
    assert isinstance(pid, int) and pid > 1
    try:
        os.kill(pid, signal.SIGSTOP)
        hung = time.monotonic()
        at, verdict = cloud.until(k, "w2", "down")
        assert verdict == "down: timeout"
        down = at - hung
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed = time.monotonic()
    at, _ = cloud.until(k, "w2", "up")
    up = at - resumed
    print(f"\nhealth: a hung HTTP service (SIGSTOP) reported down: timeout after {down:.2f} s (bound {BOUND} s), "
          f"up {up:.2f} s after SIGCONT")
    assert down <= BOUND + REPORT_SLACK, down
    assert up <= BOUND + REPORT_SLACK, up


def test_an_agent_restart_keeps_the_verdicts_and_checks_on(cloud: HcCloud) -> None:
    """kill -9 the agent and start it again: the store's verdicts (one up, one down) never change, the
    new agent takes them over (seeded, so its first checks confirm them and write nothing), and it
    does check: a hang after the restart is reported (the positive control)."""
    up_k, down_k = key(IP_HTTP, 83), key(IP_HTTP, 84)
    cloud.map(IP_HTTP, 83, ["w2"], {"kind": "http", "port": 8000, "path": "/ready", "interval": INTERVAL,
                                    "timeout": TIMEOUT, "threshold": THRESHOLD})
    cloud.map(IP_HTTP, 84, ["w2"], {**TCP_CHECK, "port": 8001})
    cloud.until(up_k, "w2", "up")
    cloud.until(down_k, "w2", "down")
    before = {k: cloud.health(k) for k in (up_k, down_k)}
    log_offset = len(cloud.agent_log())
    faults.kill_agent(cloud.lab, "h1")
    restarted = time.monotonic()
    wait_for("the new agent checking", lambda: cloud.agent_log()[log_offset:].count(" every 1.0 s") >= 2)
    seen: list[dict[MappingKey, dict[str, str]]] = []
    while time.monotonic() < restarted + 2 * INTERVAL * THRESHOLD:
        seen.append({k: cloud.health(k) for k in (up_k, down_k)})
        time.sleep(0.02)
    assert all(s == before for s in seen), [s for s in seen if s != before][:3]
    assert "(was unchecked)" not in cloud.agent_log()[log_offset:]
    pid = cloud.api.get("/v1/containers/w2").json()["status"]["pid"]
    try:
        os.kill(pid, signal.SIGSTOP)
        _, verdict = cloud.until(up_k, "w2", "down")
        assert verdict == "down: timeout"
    finally:
        os.kill(pid, signal.SIGCONT)
    cloud.until(up_k, "w2", "up")
