"""``portmesh lab up --ha`` as a user runs it (issue 13 item 9): the real console script in subprocesses.

A 2-host lab with a 3-member Raft store and two controllers: ``lab status`` shows three members
(one leader) and two controllers (one master), a container with a mapping answers from inet
(and a port it does not map does not: the negative check, with the mapped port as its control),
``lab fault kill-store-member leader`` and ``kill-controller [--which standby]`` work on it
from the CLI, and ``lab down`` leaves nothing: no namespace, no process, no interface or address in the
machine's namespace, no state directory. The lab is taken down whatever happens.

Reproduce by hand: ``portmesh lab up --ha --hosts 2; portmesh lab status; portmesh lab down``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from portmesh.lab import node, services
from portmesh.lab.network import INET_IP
from portmesh.lab.state import LabState, lab_dir
from portmesh.runtime import procs

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(shutil.which("ovs-vswitchd") is None, reason="openvswitch-switch is not installed"),
]

PORTMESH = str(Path(sys.executable).parent / "portmesh")
IP, PORT, UNMAPPED = "203.0.113.61", 9000, 9001
LAB_RANGES = ("198.18.", "198.19.", "198.51.100.", "203.0.113.")

# One UDP datagram from inet to IP:PORT: prints the answer, or "timeout".
UDP_ONCE = (
    "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(1.0)\n"
    "try:\n s.sendto(b'1',(sys.argv[1],int(sys.argv[2]))); print(s.recv(200).decode().strip())\n"
    "except OSError: print('timeout')"
)


def pm(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PORTMESH_")}
    return subprocess.run([PORTMESH, *args], env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def root_view() -> set[str]:
    """The machine's own interfaces, addresses and routes (the lab must add none)."""
    out = ""
    for argv in (["ip", "-o", "link"], ["ip", "-o", "addr"], ["ip", "-o", "route", "show", "table", "all"]):
        out += subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return {" ".join(line.split()[1:]) for line in out.splitlines()}  # without the ifindex


def status(name: str) -> dict[str, Any]:
    r = pm("lab", "status", "--name", name)
    assert r.returncode == 0, r.stderr
    result: dict[str, Any] = json.loads(r.stdout)
    return result


def wait_roles(name: str, timeout: float = 30.0) -> dict[str, Any]:
    """Status once the store has one leader and the controllers one master and one standby."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(name)
        members = sorted(str(m["role"]) for m in st["store_members"].values())
        ctls = sorted(str(c["role"]) for c in st["controllers"].values())
        if members == ["follower", "follower", "leader"] and ctls == ["master", "standby"]:
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"roles not settled within {timeout:.0f} s: {st}")
        time.sleep(0.2)


def fault(name: str, *argv: str) -> dict[str, Any]:
    r = pm("lab", "fault", *argv, "--name", name, "--json", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    result: dict[str, Any] = json.loads(r.stdout)
    print(" ".join(argv), "->", result)
    return result


def udp_once(state: LabState, port: int) -> str:
    argv = [sys.executable, "-c", UDP_ONCE, IP, str(port)]
    return node.run(argv, netns=state.ns("inet")).stdout.strip()


def test_lab_up_ha_runs_three_store_members_two_controllers_and_down_leaves_nothing() -> None:
    name = f"hau{os.getpid() % 10000}"
    before = root_view()
    state: LabState | None = None
    try:
        r = pm("lab", "up", "--ha", "--hosts", "2", "--name", name, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "store cluster of 3 members formed" in r.stderr, r.stderr
        state = LabState.load(name)
        assert state is not None and state.ha

        st = wait_roles(name)
        assert set(st["store_members"]) == {"store-1", "store-2", "store-3"}
        assert all(m["status"] == "cluster member" for m in st["store_members"].values()), st
        assert st["store_leader"] in st["store_members"]
        assert {c: v["listen"] for c, v in st["controllers"].items()} == {
            "controller-1": "tcp:198.18.0.1:6653", "controller-2": "tcp:198.18.0.1:6654"}
        assert all(p["alive"] for p in st["processes"].values()), st["processes"]
        assert "store" not in st["processes"] and "controller" not in st["processes"]
        for host in state.hosts:  # every client lists every member
            agent = state.process(f"agent:{host}")
            assert agent is not None and services.cluster_tcp_remote() in agent.argv, agent
        api = state.process("api")
        assert api is not None and services.cluster_unix_remote(state.dir) in api.argv

        env_lines = pm("lab", "env", "--name", name).stdout.split("\n")
        env = dict(line.removeprefix("export ").split("=", 1) for line in env_lines if line.startswith("export "))
        r = pm("run", "hac1", "--host", "h2", "--ip", IP, "--port", f"{PORT}/udp", "--",
               sys.executable, "-m", "portmesh.lab.whoami", "--name", "hac1", "--udp", str(PORT), "--udp", str(UNMAPPED),
               env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        deadline = time.monotonic() + 20
        while (answer := udp_once(state, PORT)) == "timeout" and time.monotonic() < deadline:
            pass
        assert answer.startswith(f"name=hac1 client={INET_IP}:"), answer  # the client's own address: no NAT
        assert f"local={IP}:{PORT}" in answer, answer
        assert udp_once(state, UNMAPPED) == "timeout"  # it listens there too, but the port is not mapped
        assert udp_once(state, PORT).startswith("name=hac1")  # and the mapped one still answers (control)

        # The drills a user runs on it (portmesh lab fault ... --json): each restarts what it killed.
        killed = fault(name, "kill-store-member", "leader")
        assert killed["target"] == st["store_leader"] and "was the leader" in killed["notes"][0], killed
        assert killed["details"]["API write accepted again"] <= 10, killed
        master = next(c for c, v in wait_roles(name)["controllers"].items() if v["role"] == "master")
        taken = fault(name, "kill-controller")  # --which master is the default
        standby = ({"controller-1", "controller-2"} - {master}).pop()
        assert taken["target"] == master and f"{standby} became master" in taken["details"], taken
        assert taken["flow_mods"] == 0, taken
        again = fault(name, "kill-controller", "--which", "standby", "--signal", "TERM")
        assert again["target"] == master and list(again["details"]) == [f"{master} back as standby"], again
        st = wait_roles(name)
        assert st["controllers"][standby]["role"] == "master" and all(p["alive"] for p in st["processes"].values())
        assert udp_once(state, PORT).startswith("name=hac1")  # the mapping answers after all of it
    finally:
        down = pm("lab", "down", "--name", name, timeout=180)
    assert down.returncode == 0 and "nothing left" in down.stdout + down.stderr, down.stdout + down.stderr
    assert state is not None
    assert not [ns for ns in node.names() if ns.startswith(state.prefix)]
    assert not [p.label for p in state.processes if procs.alive(p.ref)]
    assert not lab_dir(name).exists()
    added = root_view() - before
    assert not [line for line in added if any(r in line for r in LAB_RANGES) or state.prefix in line], added
