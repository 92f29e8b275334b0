"""Light containers: what they see of the host, their environment, restart policy and stop timeout.

Issue 10 item 10: ``python3 -m http.server 80`` in a light container served the
lab's API token to the internet. The first tests drive the light runtime
directly (root, one network namespace per container, no lab); the last one
builds a real lab and fetches over HTTP from ``inet``: the container's own
directory is served (positive control), the token is not.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import httpx
import pytest

from portmesh.lab import node, services
from portmesh.lab.network import Lab
from portmesh.lab.state import LabState
from portmesh.model.entities import Container, PortBlock, RestartPolicy, RunState
from portmesh.runtime.light import LightRuntime
from tests.lab.conftest import lab_suffix

pytestmark = [pytest.mark.lab, pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root")]

TAG = f"iso{os.getpid() % 10000}"


@pytest.fixture
def runtime() -> Iterator[tuple[LightRuntime, Path]]:
    """A light runtime whose state lies where a lab's does, next to a secret like the lab's token."""
    top = Path("/run/portmesh") / f"{TAG}r"  # not the lab's directory (the lab below is named TAG)
    state = top / "h1" / "agent"
    state.mkdir(parents=True)
    (top / "api.token").write_text("TOPSECRET\n")
    rt = LightRuntime(state)
    try:
        yield rt, top
    finally:
        for name in rt.known():
            rt.remove(name)
        shutil.rmtree(top, ignore_errors=True)


def container(name: str, *command: str, restart: RestartPolicy = RestartPolicy.NO, env: tuple[str, ...] = ()) -> Container:
    return Container(
        name, "h1", "02:00:00:00:00:01", (IPv4Address("203.0.113.5"),), PortBlock(32768, 1024), command, None, env, restart
    )


def wait_exited(rt: LightRuntime, name: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (status := rt.status(name)) is None or status.state == RunState.RUNNING:
        assert time.monotonic() < deadline, f"{name} still runs: {status}"
        time.sleep(0.05)


def test_light_container_sees_no_portmesh_state_and_starts_in_its_own_dir(
    runtime: tuple[LightRuntime, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    rt, top = runtime
    monkeypatch.setenv("PORTMESH_TOKEN", "from-the-agent-env")
    script = f"pwd; ls -A; cat {top}/api.token || echo NO-TOKEN; echo env=$FOO/$PORTMESH_TOKEN/$HOSTNAME; echo made > mine"
    c = container("c1", "sh", "-c", script, env=("FOO=a b=c",))
    first = rt.start(c, f"pm-{TAG}-")
    assert first.runtime == "light" and first.pid is not None and first.netns == f"pm-{TAG}-c-c1"
    wait_exited(rt, "c1")
    out = rt.log_path("c1").read_text().splitlines()
    workdir = rt.isolation("c1").workdir
    assert (top / "api.token").read_text() == "TOPSECRET\n"  # positive control: the host reads it
    assert out[0] == str(workdir)  # its own working directory, empty at first
    assert "NO-TOKEN" in out and "TOPSECRET" not in out
    assert "env=a b=c//c1" in out  # its own env; the agent's PORTMESH_TOKEN is not inherited
    assert (workdir / "mine").read_text() == "made\n"  # what it writes there, the host sees there
    rt.remove("c1")
    assert not workdir.exists()


@pytest.mark.parametrize(
    ("policy", "code", "restarted"),
    [
        (RestartPolicy.NO, 3, False),
        (RestartPolicy.ON_FAILURE, 3, True),
        (RestartPolicy.ON_FAILURE, 0, False),
        (RestartPolicy.ALWAYS, 0, True),
    ],
)
def test_restart_policy(runtime: tuple[LightRuntime, Path], policy: RestartPolicy, code: int, restarted: bool) -> None:
    rt, _ = runtime
    c = container("r1", "sh", "-c", f"echo run; exit {code}", restart=policy)
    rt.start(c, f"pm-{TAG}-")
    wait_exited(rt, "r1")
    exited = rt.status("r1")
    assert exited is not None and exited.state == RunState.EXITED and exited.exit_code == code, exited
    assert f"code {code}" in exited.message
    again = rt.start(c, f"pm-{TAG}-")  # what the agent does on each pass while the container should run
    if restarted:
        assert again.restarts == 1  # it may have exited again already: the log counts the runs
        wait_exited(rt, "r1")
        assert rt.log_path("r1").read_text().count("run") == 2
    else:
        assert again.state == RunState.EXITED and again.restarts == 0 and again.exit_code == code
        assert rt.log_path("r1").read_text().count("run") == 1
        # `portmesh start` of the exited container (the store counts it in ``starts``): it runs again.
        asked = rt.start(dataclasses.replace(c, starts=c.starts + 1), f"pm-{TAG}-")
        assert asked.restarts == 0
        wait_exited(rt, "r1")
        assert rt.log_path("r1").read_text().count("run") == 2
        c = dataclasses.replace(c, starts=c.starts + 1)
    # A stop then a start is asked for: it runs again, whatever the policy, and the count starts anew.
    runs = rt.log_path("r1").read_text().count("run")
    rt.stop("r1", timeout=1)
    fresh = rt.start(c, f"pm-{TAG}-")
    assert fresh.restarts == 0
    wait_exited(rt, "r1")
    assert rt.log_path("r1").read_text().count("run") == runs + 1


def test_stop_timeout_kills_a_process_that_ignores_sigterm(runtime: tuple[LightRuntime, Path]) -> None:
    rt, _ = runtime
    c = container("s1", "sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done")
    rt.start(c, f"pm-{TAG}-")
    deadline = time.monotonic() + 5
    while "ready" not in rt.log_path("s1").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    began = time.monotonic()
    rt.stop("s1", timeout=1)
    took = time.monotonic() - began
    status = rt.status("s1")
    assert status is not None and status.state == RunState.EXITED
    assert 0.9 <= took < 4.0, took  # waited the timeout after SIGTERM, then SIGKILL


@pytest.fixture(scope="module")
def cloud(datapath: str) -> Iterator[tuple[LabState, httpx.Client]]:
    """A real one-host lab (agent, API, OVS or eBPF), shared by the tests below; always taken down."""
    if datapath == "ovs" and shutil.which("ovs-vswitchd") is None:
        pytest.skip("openvswitch-switch is not installed")
    lab = Lab(f"{TAG}{lab_suffix(datapath)}", say=lambda _msg: None)
    try:
        state = lab.up(hosts=1, datapath=datapath)
        if not state.api_url or state.process("agent:h1") is None:
            pytest.skip("no API or agent in this lab")
        token = services.token_file(state.dir).read_text().strip()
        with httpx.Client(base_url=state.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
            yield state, http
    finally:
        lab.down()


def test_http_server_in_a_light_container_does_not_serve_the_api_token(cloud: tuple[LabState, httpx.Client]) -> None:
    """The README's example, from inet: the container's directory is served, the lab's token is not."""
    state, http = cloud
    token_path = services.token_file(state.dir)
    token = token_path.read_text().strip()
    server = (
        "import http.server as h, pathlib as p; p.Path('hello.txt').write_text('hello\\n'); "
        "h.test(h.SimpleHTTPRequestHandler, port=80, bind='0.0.0.0')"
    )
    body = {
        "name": "web",
        "host": "h1",
        "ips": ["203.0.113.10"],
        "ports": [{"port": 80}],
        "command": [sys.executable, "-c", server],
    }
    assert http.post("/v1/containers", json=body).status_code == 201
    try:
        base = "http://203.0.113.10:80"
        deadline = time.monotonic() + 30
        hello = ""
        while time.monotonic() < deadline and hello != "hello\n":
            hello = node.run(["curl", "-s", "-m", "2", f"{base}/hello.txt"], netns=state.ns("inet"), check=False).stdout
            time.sleep(0.3)
        assert hello == "hello\n"  # positive control: reachable from inet, serving its own directory
        for path in (str(token_path), f"/../../../..{token_path}", "/%2e%2e/" * 8 + str(token_path).lstrip("/")):
            curl = ["curl", "-s", "--path-as-is", "-m", "5", "-w", "\\n%{http_code}", f"{base}{path}"]
            answer = node.run(curl, netns=state.ns("inet"), check=False)
            assert token not in answer.stdout
            assert answer.stdout.rstrip().endswith("404"), answer.stdout[-200:]
        status = http.get("/v1/containers/web").json()["status"]
        assert status["runtime"] == "light" and status["netns"] == state.ns("c-web")
        pid = status["pid"]
        # In the container's own mount namespace the file is absent (nsenter into its mount ns, as `exec` does),
        # while its own file is there (positive control).
        inside = node.run(["nsenter", "-t", str(pid), "-m", "cat", str(token_path)], check=False)
        assert inside.returncode != 0 and token not in inside.stdout
        workdir = services.agent_state_dir(state.dir, "h1") / "work" / "web"
        assert node.run(["nsenter", "-t", str(pid), "-m", "cat", str(workdir / "hello.txt")]).stdout == "hello\n"
    finally:
        http.delete("/v1/containers/web")


def test_restart_policy_through_the_agent(cloud: tuple[LabState, httpx.Client]) -> None:
    """on-failure: restarted on the agent's passes, counted; no (the default): stays exited with its code.

    The on-failure container's restarts are the clock: once it was restarted twice, the
    agent has made at least two passes in which it could have restarted the other one.
    """
    _, http = cloud
    command = ["sh", "-c", "echo run; exit 3"]
    for name, ip, extra in (("crash", "203.0.113.21", {"restart": "on-failure"}), ("once", "203.0.113.22", {})):
        body = {"name": name, "host": "h1", "ips": [ip], "command": command, **extra}
        assert http.post("/v1/containers", json=body).status_code == 201, name
    try:
        deadline = time.monotonic() + 40
        crash: dict[str, object] = {}
        while time.monotonic() < deadline:
            crash = http.get("/v1/containers/crash").json()["status"] or {}
            if int(str(crash.get("restarts") or 0)) >= 2:
                break
            time.sleep(0.2)
        assert int(str(crash.get("restarts"))) >= 2 and crash.get("exit_code") == 3, crash
        once = http.get("/v1/containers/once").json()
        assert once["restart"] == "no" and once["running"] is True  # desired to run, yet left exited: Docker's default
        status = once["status"]
        assert (status["state"], status["exit_code"], status["restarts"]) == ("exited", 3, 0), status
        assert "code 3" in status["message"]
        logs = http.get("/v1/containers/once/logs").json()
        assert logs["text"] == "run\n" and logs["running"] is False  # ran once; `logs -f` can stop
        assert http.get("/v1/containers/crash/logs").json()["text"].count("run") >= 3
        # `portmesh start` of the exited container runs it again, as `docker start` does.
        assert http.post("/v1/containers/once/start").status_code == 200
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and http.get("/v1/containers/once/logs").json()["text"] != "run\nrun\n":
            time.sleep(0.2)
        assert http.get("/v1/containers/once/logs").json()["text"] == "run\nrun\n"
        assert http.get("/v1/containers/once").json()["status"]["restarts"] == 0
    finally:
        http.delete("/v1/containers/crash")
        http.delete("/v1/containers/once")
