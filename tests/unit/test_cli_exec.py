"""``portmesh exec NAME -- CMD``: found through the API (any lab, ``--api``/``PORTMESH_API``), entered with nsenter.

The plan is checked with a fake ``/proc``; the real thing runs ``.venv/bin/portmesh exec`` against
a process of our own in a network namespace of its own (``unshare --net``), so it needs root.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from portmesh.cli import app as cli
from portmesh.cli import enter
from portmesh.model.entities import ContainerStatus, Host, RunState
from tests.unit.fakes import FakeStore
from tests.unit.test_cli import IP, TOKEN, Server

PORTMESH = str(Path(sys.executable).parent / "portmesh")
SAME = (1, 100)


def fake_ns(differs: dict[str, tuple[int, int] | None]) -> Any:
    """A fake ``ns_id``: every namespace is ours unless ``differs`` says otherwise (by path)."""

    def ident(path: str) -> tuple[int, int] | None:
        if path in differs:
            return differs[path]
        return SAME

    return ident


def container(**status: Any) -> dict[str, Any]:
    return {"name": "web", "host": "h1", "image": status.pop("image", None), "status": status or None}


def test_plan_light_running_enters_what_differs() -> None:
    ident = fake_ns({"/run/netns/pm-x-web": (1, 7), "/proc/42/ns/net": (1, 7)})
    p = enter.plan(container(state="running", netns="pm-x-web", pid=42), ident)
    assert p.namespaces == ["net"] and p.argv == ["nsenter", "--target=42", "--net"] and p.env is None


def test_plan_image_enters_every_namespace_of_its_process() -> None:
    own: dict[str, tuple[int, int] | None] = {f"/proc/42/ns/{ns}": (1, 50 + i) for i, ns in enumerate(enter.NSENTER_FLAGS)}
    own["/proc/42/ns/user"] = SAME  # no user namespace: not entered
    p = enter.plan(container(state="running", netns="/proc/42/ns/net", pid=42, image="busybox"), fake_ns(own))
    assert p.namespaces == ["mnt", "uts", "ipc", "pid", "net", "cgroup"]
    assert p.argv[:2] == ["nsenter", "--target=42"] and "--mount" in p.argv and "--pid" in p.argv
    assert p.argv[-2:] == ["--root", "--wd"], "the container's filesystem, not the host's"


def test_plan_stopped_light_container_enters_its_named_netns() -> None:
    p = enter.plan(container(state="exited", netns="pm-x-web", pid=None), fake_ns({}))
    assert p.argv == ["nsenter", "--net=/run/netns/pm-x-web"]


@pytest.mark.parametrize(
    ("c", "ident", "says"),
    [
        (container(state="running", netns="pm-x-web", pid=42), {"/run/netns/pm-x-web": None}, "not on this machine"),
        (
            container(state="running", netns="pm-x-web", pid=42),
            {"/run/netns/pm-x-web": (1, 7), "/proc/42/ns/net": (1, 8)},
            "not on this machine",  # PID 42 here is some other process
        ),
        (container(state="error", netns="", pid=None, message="boom"), {}, "state: error: boom"),
        (container(), {}, "state: pending"),
        (container(state="exited", netns="/proc/9/ns/net", pid=None, image="b"), {}, "is not running"),
    ],
)
def test_plan_refuses_in_one_line(c: dict[str, Any], ident: dict[str, Any], says: str) -> None:
    with pytest.raises(enter.NotHere) as exc:
        enter.plan(c, fake_ns(ident))
    assert says in str(exc.value) and "\n" not in str(exc.value)


@pytest.fixture
def server() -> Iterator[Server]:
    with Server(FakeStore(auto_converge=True)) as s:
        s.store.add_host(Host("h1", 1))
        yield s


def env_for(server: Server) -> dict[str, str]:
    return {**os.environ, "PORTMESH_API": server.url, "PORTMESH_TOKEN": TOKEN, "PORTMESH_TOKEN_FILE": "/nonexistent"}


@pytest.mark.parametrize(
    "argv",
    [
        ["exec", "web", "--", "echo", "--name=ux", "hi"],
        ["exec", "web", "echo", "--name=ux", "hi"],
        ["exec", "web", "--", "ping", "-n", "-c", "1", IP],
        ["exec", "web", "--", "ls", "--help"],
        ["exec", "web", "--", "sh", "-c", "a -- b", "--"],
        ["exec", "-it", "web", "--", "sh", "-i"],
        ["exec", "-i", "-t", "web", "sh", "-t"],
    ],
)
def test_exec_hands_the_command_over_verbatim(server: Server, monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    r = CliRunner().invoke(cli.app, ["run", "web", "--host", "h1", "--ip", IP], env=env_for(server))
    assert r.exit_code == 0, r.output
    seen: list[list[str]] = []
    monkeypatch.setattr(enter, "plan", lambda c: enter.Plan(["nsenter"], []))
    monkeypatch.setattr(enter, "exec_argv", lambda p, command: seen.append(command))
    r = CliRunner().invoke(cli.app, argv, env=env_for(server))
    assert r.exit_code == 0, r.output
    after = argv.index("web") + 1
    command = argv[after + 1 :] if argv[after] == "--" else argv[after:]
    assert seen == [command]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_exec_enters_the_reported_namespace(server: Server) -> None:
    """End to end: the CLI asks the API (PORTMESH_API, not any lab) and runs the command in the container's netns."""
    proc = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    try:
        netns = f"/proc/{proc.pid}/ns/net"
        # wait for unshare to have exec'd sleep in the new namespace (readiness, not a sleep)
        mine = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while os.readlink(netns) == mine or Path(f"/proc/{proc.pid}/comm").read_text().strip() != "sleep":
            assert time.monotonic() < deadline, "unshare did not reach sleep in a namespace of its own"
            time.sleep(0.01)
        r = CliRunner().invoke(cli.app, ["run", "web", "--host", "h1", "--ip", IP], env=env_for(server))
        assert r.exit_code == 0
        server.store.report_container_status("web", ContainerStatus(RunState.RUNNING, netns, proc.pid, "", ""))
        run = subprocess.run(
            [PORTMESH, "exec", "web", "--", "sh", "-c", 'readlink /proc/self/ns/net; echo "$@"', "sh", "--name=ux", "hi"],
            env=env_for(server),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.splitlines() == [os.readlink(netns), "--name=ux hi"]
        # Positive control for "not here": the same container once its process is gone.
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        run = subprocess.run([PORTMESH, "exec", "web", "--", "true"], env=env_for(server), capture_output=True, text=True)
        assert run.returncode == 1 and "not on this machine" in run.stderr and "Traceback" not in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1
    finally:
        proc.kill()
        proc.wait()


def test_plan_takes_the_runtime_the_agent_reported() -> None:
    c = container(state="exited", netns="/proc/9/ns/net", pid=None, runtime="image")
    with pytest.raises(enter.NotHere, match="is not running"):
        enter.plan(c, fake_ns({}))
    c = container(state="exited", netns="pm-x-web", pid=None, runtime="light")
    assert enter.plan(c, fake_ns({})).namespaces == ["net"]
