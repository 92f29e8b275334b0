"""Issue 15, load balancing, in a real 3-host lab: one public (IP, port), several containers.

One lab for the module (h1 the gateway host facing inet, h2 and h3 compute hosts), named
uniquely and taken down whatever happens. Every backend is a container holding the same public
IP 203.0.113.30 and running tools/lbtools.py serve: each connection gets a line naming the
backend and the client address it saw, then its lines are echoed. Mappings are made through
the API (``POST /v1/mappings`` with ``backends`` and ``weights``); traffic comes from the lab's
inet namespace and from containers. One mapping per test, so the tests do not depend on each
other's changes:

    .30:80   b1 b2 b3, b3 weight 2           the spread by weight; no NAT; DSR
    .30:81   b1 b2 b4 (+ b3, - b1, b4 lost)  long-lived connections across backend changes
    .30:82   b1 b2 b3, tcp health check      a stopped service leaves and returns
    .30:83   b1 b2 b3, tcp health check      a down backend gets no new connection, even on a reused 5-tuple
    .30:8080 s2 (a plain one-backend mapping; s2 shares .30 on h2, a backend's neighbour)

    b1 h1, b2 h2, b3 h3, b4 h2 (two backends on one host), s2 h2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from portmesh.lab import node, services
from portmesh.lab.network import INET_IP, Lab
from portmesh.lab.state import LabState
from tests.lab.conftest import lab_suffix
from tests.lab.test_mapping_e2e import keep_logs
from tests.lab.test_multihost import wait_for

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(shutil.which("ovs-vswitchd") is None, reason="openvswitch-switch is not installed"),
    pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump is not installed"),
]

TOOLS = Path(__file__).parent / "tools"
LB, CLIENTS = str(TOOLS / "lbtools.py"), str(TOOLS / "clients.py")
VIP = "203.0.113.30"
# Fixed client ports, below inet's ephemeral range (32768-60999), so no automatic choice collides.
PINNED_PORTS, FRESH_PORTS = 10000, 20000
CONTROL = 9000  # lbtools serve's control port, on the container's 127.0.0.1
OUTSIDE_PORT = 7000
SERVED = (80, 81, 82, 83, 8080)
PLACES = {"b1": "h1", "b2": "h2", "b3": "h3", "b4": "h2", "s2": "h2"}


class LbCloud:
    """The lab, its API and the traffic tools."""

    def __init__(self, lab: Lab, state: LabState) -> None:
        self.lab, self.state = lab, state
        token = services.token_file(state.dir).read_text().strip()
        self.api = httpx.Client(base_url=state.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def ns(self, where: str) -> str:
        return self.lab.netns_of(where)

    def run(self, name: str, host: str, ports: tuple[int, ...] = SERVED, udp: tuple[int, ...] = ()) -> None:
        """A container holding the VIP and serving ``ports``, with no mapping of its own (ports: [])."""
        command = [sys.executable, LB, "serve", "--name", name, "--control", str(CONTROL)]
        command += [arg for p in ports for arg in ("--tcp", str(p))]
        command += [arg for p in udp for arg in ("--udp", str(p))]
        body = {"name": name, "host": host, "ips": [VIP], "ports": [], "command": command}
        reply = self.api.post("/v1/containers", params={"wait": "true"}, json=body)
        assert reply.status_code == 201, reply.text
        self.wait_running(name)
        wait_for(f"{name} listening", lambda: self.sh(name, "ss", "-Hltn", f"sport = :{ports[0]}").strip())

    def wait_running(self, name: str, timeout: float = 20) -> dict[str, Any]:
        def running() -> dict[str, Any] | None:
            info: dict[str, Any] = self.api.get(f"/v1/containers/{name}").json()
            return info if (info.get("status") or {}).get("state") == "running" else None

        found: dict[str, Any] = wait_for(f"{name} running", running, timeout)
        return found

    def map(self, port: int, backends: list[str], **extra: Any) -> dict[str, Any]:
        body = {"public_ip": VIP, "proto": "tcp", "port": port, "backends": backends, **extra}
        reply = self.api.post("/v1/mappings", params={"wait": "true"}, json=body)
        assert reply.status_code == 201, reply.text
        out: dict[str, Any] = reply.json()
        return out

    def mapping(self, port: int) -> dict[str, Any]:
        reply = self.api.get(f"/v1/mappings/{VIP}/tcp/{port}")
        if reply.status_code == 200:
            found: dict[str, Any] = reply.json()
            return found
        listed = [m for m in self.api.get("/v1/mappings").json() if m["public_ip"] == VIP and m["port"] == port]
        assert listed, reply.text
        first: dict[str, Any] = listed[0]
        return first

    def tool(self, where: str, script: str, *args: str, timeout: float = 120) -> dict[str, Any]:
        out = node.run([sys.executable, script, *args], netns=self.ns(where), check=True, timeout=timeout).stdout
        result: dict[str, Any] = json.loads(out)
        return result

    def spread(self, where: str, port: int, count: int, host: str = VIP) -> dict[str, Any]:
        return self.tool(where, LB, "spread", "--host", host, "--port", str(port), "--count", str(count),
                         "--concurrency", "50")

    def sh(self, where: str, *argv: str, check: bool = True) -> str:
        return node.run(argv, netns=self.ns(where), check=check).stdout


class Held:
    """tools/lbtools.py hold in inet: long-lived connections exchanging a line every 0.1 s."""

    def __init__(self, cloud: LbCloud, port: int, count: int) -> None:
        argv = ["ip", "netns", "exec", cloud.ns("inet"), sys.executable, LB, "hold", "--host", VIP,
                "--port", str(port), "--count", str(count), "--every", "0.1"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def report(self) -> list[dict[str, Any]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("report\n")
        self.proc.stdin.flush()
        conns: list[dict[str, Any]] = json.loads(self.proc.stdout.readline())["conns"]
        return conns

    def open(self, count: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"open {count}\n")
        self.proc.stdin.flush()

    def settled(self, count: int) -> list[dict[str, Any]]:
        """Wait until ``count`` connections have each exchanged a few lines (readiness, not a sleep)."""
        def ready() -> list[dict[str, Any]] | None:
            conns = self.report()
            return conns if len(conns) >= count and all(c["exchanged"] >= 3 or c["broken"] for c in conns) else None

        found: list[dict[str, Any]] = wait_for(f"{count} held connections exchanging lines", ready)
        return found

    def progress(self, before: list[dict[str, Any]], names: set[str]) -> list[dict[str, Any]]:
        """Wait until every connection on a backend of ``names`` moved on by a few more lines; return the report."""
        def moved() -> list[dict[str, Any]] | None:
            now = self.report()
            on = [i for i, c in enumerate(before) if c["name"] in names]
            if any(now[i]["broken"] for i in on):
                return now
            return now if all(now[i]["exchanged"] >= before[i]["exchanged"] + 5 for i in on) else None

        found: list[dict[str, Any]] = wait_for("held connections moving on", moved)
        return found

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def cloud(datapath: str) -> Iterator[LbCloud]:
    lab = Lab(f"lb{os.getpid() % 10000}{lab_suffix(datapath)}", say=lambda _msg: None)
    outside: subprocess.Popen[bytes] | None = None
    try:
        state = lab.up(hosts=3, tune_rmem=False, datapath=datapath)
        assert state.api_url, "the lab came up without an API"
        c = LbCloud(lab, state)
        for name, host in PLACES.items():
            c.run(name, host)
        c.map(8080, ["s2"])
        outside = subprocess.Popen(
            ["ip", "netns", "exec", state.ns("inet"), sys.executable, "-m", "portmesh.lab.whoami",
             "--name", "outside", "--tcp", str(OUTSIDE_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        outside_args = ("tcp", "--host", INET_IP, "--port", str(OUTSIDE_PORT))
        wait_for("the outside server", lambda: c.tool("inet", CLIENTS, *outside_args)["ok"])
        yield c
    finally:
        if outside is not None:
            outside.terminate()
            outside.wait(10)
        keep_logs(lab)
        lab.down()


# --- spread by weight, no NAT, direct server return -----------------------------------------

SPREAD_COUNT = 3000
# Each share within 5 percentage points of its weight's share. Over 3000 connections a fair
# choice per connection has a standard deviation of 0.8 points at 25 % (0.9 at 50 %): 5 points
# is over 5 sigma, so the test does not flake on chance; and a select group hashing into a
# table of buckets (OVS dp_hash: 64 or more slots filled by weight) is off by at most
# 1/64 ~ 1.6 points by construction. A spread ignoring weights (33/33/33) misses b3's 50 % by 17.
SPREAD_TOLERANCE = 0.05


def test_new_connections_spread_by_weight_and_see_the_real_client(cloud: LbCloud) -> None:
    made = cloud.map(80, ["b1", "b2", "b3"], weights={"b3": 2})
    assert [b["container"] for b in made["mapping"]["backends"]] == ["b1", "b2", "b3"], made
    result = cloud.spread("inet", 80, SPREAD_COUNT)
    assert result["ok"] == SPREAD_COUNT, result["errors"]
    names = result["names"]
    shares = {n: names.get(n, 0) / SPREAD_COUNT for n in ("b1", "b2", "b3")}
    want = {"b1": 0.25, "b2": 0.25, "b3": 0.5}
    print(f"spread over {SPREAD_COUNT} connections, weights 1/1/2: "
          + ", ".join(f"{n} {names.get(n, 0)} ({shares[n]:.1%})" for n in want) + f" in {result['seconds']} s")
    assert set(names) == {"b1", "b2", "b3"}, names
    for n, share in want.items():
        assert abs(shares[n] - share) <= SPREAD_TOLERANCE, (n, shares)
    # No NAT, direct server return: every backend saw inet's own address and source port on the VIP
    # itself, and inet's kernel took each answer as coming from the VIP (nothing in between rewrote it).
    assert result["not_real_client"] == 0, result["sample"]
    assert all(r["client"].startswith(f"{INET_IP}:") and r["local"] == f"{VIP}:80" for r in result["sample"])
    # A weight changed (PATCH): new connections follow the new weights, 1/1/1.
    reply = cloud.api.patch(f"/v1/mappings/{VIP}/tcp/80", params={"wait": "true"}, json={"weights": {"b3": 1}})
    assert reply.status_code == 200, reply.text
    even = cloud.spread("inet", 80, SPREAD_COUNT)
    assert even["ok"] == SPREAD_COUNT, even["errors"]
    print(f"after PATCH weights b3=1: {even['names']}")
    for n in ("b1", "b2", "b3"):
        assert abs(even["names"].get(n, 0) / SPREAD_COUNT - 1 / 3) <= SPREAD_TOLERANCE, even["names"]


# --- connections stay put across backend changes ----------------------------------------------


def broken_on(conns: list[dict[str, Any]], names: set[str]) -> list[dict[str, Any]]:
    return [c for c in conns if c["name"] in names and c["broken"]]


def test_long_lived_connections_survive_backend_add_remove_and_loss(cloud: LbCloud) -> None:
    cloud.map(81, ["b1", "b2", "b4"])
    held = Held(cloud, 81, 30)
    try:
        first = held.settled(30)
        on = {n: sum(1 for c in first if c["name"] == n) for n in ("b1", "b2", "b4")}
        print(f"30 held connections: {on}")
        assert not [c for c in first if c["broken"]], first
        assert all(on.values()), f"every backend holds some of the 30: {on}"

        # 1. A backend added: not one held connection breaks, and new connections reach it.
        reply = cloud.api.post(f"/v1/mappings/{VIP}/tcp/81/backends", params={"wait": "true"},
                               json={"container": "b3", "weight": 1})
        assert reply.status_code in (200, 201), reply.text
        fresh = wait_for("b3 takes new connections", lambda: cloud.spread("inet", 81, 60)["names"].get("b3"))
        assert fresh
        after_add = held.progress(first, {"b1", "b2", "b4"})
        assert not broken_on(after_add, {"b1", "b2", "b4"}), broken_on(after_add, {"b1", "b2", "b4"})
        held.open(30)  # a second batch, opened with b3 in: some land on b3
        second = held.settled(60)
        assert not [c for c in second if c["broken"]], [c for c in second if c["broken"]]
        assert any(c["name"] == "b3" for c in second[30:]), second[30:]

        # 2. A backend removed (b1): the others' connections keep working; b1's own may drain.
        reply = cloud.api.delete(f"/v1/mappings/{VIP}/tcp/81/backends/b1", params={"wait": "true"})
        assert reply.status_code == 200, reply.text
        staying = {"b2", "b3", "b4"}
        wait_for("b1 gets no new connections", lambda: "b1" not in (r := cloud.spread("inet", 81, 60))["names"]
                 and r["ok"] == 60)
        after_rm = held.progress(second, staying)
        assert not broken_on(after_rm, staying), broken_on(after_rm, staying)
        drained = [c for c in after_rm if c["name"] == "b1"]
        print(f"backend removed: b1's {len(drained)} connections, {sum(1 for c in drained if c['broken'])} broken")

        # 3. A backend lost (b4's container stopped): no connection on a staying backend breaks.
        reply = cloud.api.post("/v1/containers/b4/stop", params={"wait": "true"})
        assert reply.status_code == 200, reply.text
        staying = {"b2", "b3"}
        after_loss = held.progress(after_rm, staying)
        assert not broken_on(after_loss, staying), broken_on(after_loss, staying)
        lost = [c for c in after_loss if c["name"] == "b4"]
        print(f"backend lost: b4's {len(lost)} connections, {sum(1 for c in lost if c['broken'])} broken; "
              f"{sum(1 for c in after_loss if c['name'] in staying)} on b2/b3 all alive")
        assert any(c["name"] in staying for c in after_loss), "control: some connections were on staying backends"
    finally:
        held.close()
        cloud.api.post("/v1/containers/b4/start", params={"wait": "true"})


# --- health checks ------------------------------------------------------------------------------


def backend_health(cloud: LbCloud, port: int) -> dict[str, str]:
    return {b["container"]: str(b.get("health")) for b in cloud.mapping(port)["backends"]}


def test_unhealthy_backend_gets_no_new_connections_and_returns(cloud: LbCloud) -> None:
    check = {"kind": "tcp", "interval": 0.5, "timeout": 0.5, "threshold": 2}
    cloud.map(82, ["b1", "b2", "b3"], health=check)
    wait_for("every backend reported up", lambda: set(backend_health(cloud, 82).values()) == {"up"})
    assert len(cloud.spread("inet", 82, 60)["names"]) == 3, "control: all three take connections"
    budget = check["interval"] * check["threshold"] + check["timeout"]

    ctl = cloud.tool("b2", LB, "ctl", "--control", str(CONTROL), "down", "82")
    stopped_at = time.monotonic()
    assert "82" not in ctl["answer"], ctl
    gone = cloud.tool("inet", LB, "watch", "--host", VIP, "--port", "82", "--name", "b2", "--absent",
                      "--count", "30", "--timeout", "1", "--limit", "30")
    assert gone["at"] is not None, gone
    took = gone["at"] - stopped_at
    health = wait_for("b2 reported down", lambda: (h := backend_health(cloud, 82))["b2"].startswith("down") and h)
    print(f"health: b2's service stopped -> no new connection to it after {took:.2f} s "
          f"(budget interval*threshold+timeout = {budget:.1f} s, {gone['rounds']} rounds of 30); health {health}")
    assert took <= budget + 1.0, f"{took:.2f} s > {budget:.1f} s (+1 s for report, store and switch)"
    assert health["b1"] == health["b3"] == "up", health
    # Down means no new connection at all: a larger batch, every one answered, none by b2 (a client
    # port reused after a refused attempt must not be pinned to b2 by what the switch learned then).
    after = cloud.spread("inet", 82, 600)
    assert after["ok"] == 600 and "b2" not in after["names"], after
    mark = cloud.api.get("/v1/mappings").json()
    assert any(m["port"] == 82 and m["public_ip"] == VIP for m in mark), mark
    ls = node.run([str(Path(sys.executable).parent / "portmesh"), "map", "ls"], env=cli_env(cloud)).stdout
    assert "b2" in ls and "down" in ls, ls

    cloud.tool("b2", LB, "ctl", "--control", str(CONTROL), "up", "82")
    started_at = time.monotonic()
    # Fresh client ports (below inet's ephemeral range, never used before): a port the switch pinned
    # to b2 earlier must not pass for b2's return (see the next test).
    back = cloud.tool("inet", LB, "watch", "--host", VIP, "--port", "82", "--name", "b2", "--fresh-port",
                      str(FRESH_PORTS), "--count", "30", "--timeout", "1", "--limit", "30")
    assert back["at"] is not None, back
    took_back = back["at"] - started_at
    up = wait_for("b2 reported up again", lambda: backend_health(cloud, 82)["b2"] == "up" and time.monotonic())
    print(f"health: b2's service back -> new connections reach it after {took_back:.2f} s, "
          f"API 'up' after {up - started_at:.2f} s; round {back['last']}")
    assert took_back <= budget + 1.0


def test_a_down_backend_gets_no_new_connection_on_a_reused_client_port(cloud: LbCloud) -> None:
    """A client port whose attempt b2 refused (its service stopped, not yet marked down) has no
    TIME-WAIT: the client's kernel may pick it again at once. Once b2 is down, a new connection from
    it must be balanced onto b1/b3 like any other, not sent to b2 by what the switch learned."""
    check = {"kind": "tcp", "interval": 0.5, "timeout": 0.5, "threshold": 2}
    cloud.map(83, ["b1", "b2", "b3"], health=check)
    wait_for("every backend reported up", lambda: set(backend_health(cloud, 83).values()) == {"up"})
    args = ("from-ports", "--host", VIP, "--port", "83", "--first-port", str(PINNED_PORTS), "--count", "30", "--timeout", "1")
    try:
        cloud.tool("b2", LB, "ctl", "--control", str(CONTROL), "down", "83")
        early = cloud.tool("inet", LB, *args)["ports"]  # at once: the check needs >= 1 s to mark b2 down
        refused = sorted(p for p, outcome in early.items() if outcome == "refused")
        assert refused and all(early[p] in ("b1", "b3") for p in early if p not in refused), early
        wait_for("b2 reported down", lambda: backend_health(cloud, 83)["b2"].startswith("down"))
        fresh = cloud.spread("inet", 83, 60)
        assert fresh["ok"] == 60 and "b2" not in fresh["names"], f"control: other ports avoid b2: {fresh}"
        again = cloud.tool("inet", LB, *args)["ports"]
        print(f"reused ports: {len(refused)} of 30 refused by b2 before it was marked down; "
              f"after: {sorted(again[p] for p in refused)}")
        assert all(again[p] in ("b1", "b3") for p in refused), {p: again[p] for p in refused}
    finally:
        cloud.tool("b2", LB, "ctl", "--control", str(CONTROL), "up", "83")


def cli_env(cloud: LbCloud) -> dict[str, str]:
    return {**os.environ, "PORTMESH_API": str(cloud.state.api_url),
            "PORTMESH_TOKEN_FILE": str(services.token_file(cloud.state.dir))}


# --- container-originated traffic and same-IP traffic ------------------------------------------


def test_backends_reach_out_and_reach_the_mapping_they_serve(cloud: LbCloud) -> None:
    # Outbound from every backend (its port block, its public IP), on every host.
    for name in ("b1", "b2", "b3"):
        result = cloud.tool(name, CLIENTS, "tcp", "--host", INET_IP, "--port", str(OUTSIDE_PORT), "--count", "20")
        assert result["ok"] == 20, (name, result["errors"])
        block = cloud.wait_running(name)["block"]
        for r in result["replies"]:
            ip, port = r["client"].split(":")
            assert ip == VIP and block["start"] <= int(port) <= block["end"], (name, r, block)
    # Same IP: s2 (h2, holds the VIP, not a backend) reaches the balanced mapping on its own IP,
    # and is spread over the backends on every host; a backend reaches s2's plain mapping.
    result = cloud.spread("s2", 80, 60)
    assert result["ok"] == 60 and result["not_real_client"] == 0, result
    assert set(result["names"]) == {"b1", "b2", "b3"}, result["names"]
    # A backend connecting to the mapping it serves: its VIP is local only for what arrives on eth0,
    # so the connection goes through the switch and is balanced like any other (itself included).
    result = cloud.spread("b2", 80, 60)
    assert result["ok"] == 60 and result["not_real_client"] == 0, result
    assert set(result["names"]) == {"b1", "b2", "b3"}, result["names"]
    for name in ("b1", "b3"):
        reply = cloud.spread(name, 8080, 5)
        assert reply["names"] == {"s2": 5}, reply
        assert reply["sample"][0]["client"].startswith(f"{VIP}:"), reply
