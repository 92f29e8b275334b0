"""Supervision (issue 13 item 7) with the real processes: ``python -m portmesh.controller`` and ``.agent``, real stores.

The converge loop is made to die through one seam (``Controller.run`` replaced before ``main``
runs, in the child only); the process must exit 1 and say why, so systemd's Restart=on-failure
or the lab restarts it. The positive control is the same process stopped with SIGTERM: exit 0.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from portmesh.lab.dummy_ovs import DummyOVS
from tests.switch.test_store import server

__all__ = ["server"]  # the fixture, re-used

CHILD = """
import asyncio, sys
import portmesh.controller.__main__ as m
if sys.argv[1] == "die":
    async def dies(self):
        await asyncio.sleep(0.5)
        raise RuntimeError("injected: the converge loop died")
    m.Controller.run = dies
m.main(sys.argv[2:])
"""


def start(mode: str, store: str, sock: Path) -> subprocess.Popen[str]:
    argv = [sys.executable, "-c", CHILD, mode, "--store", store, "--listen", f"unix:{sock}"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_listening(sock: Path, proc: subprocess.Popen[str], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(sock))
                return
            except OSError:
                time.sleep(0.05)
    raise AssertionError(f"controller not listening on {sock} (exit {proc.poll()})")


def test_a_controller_whose_converge_loop_dies_exits_1(server: str, tmp_path: Path) -> None:
    proc = start("die", server, tmp_path / "ctl.sock")
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, out
    assert "main task died: RuntimeError: injected: the converge loop died" in out
    assert "exits with status 1 so its supervisor restarts it" in out


def test_a_controller_asked_to_stop_exits_0(server: str, tmp_path: Path) -> None:
    """Positive control: the same process, no injected failure, SIGTERM once listening: a clean exit."""
    sock = tmp_path / "ctl.sock"
    proc = start("live", server, sock)
    try:
        wait_listening(sock, proc)
        time.sleep(1.0)  # longer than the injected death takes in the other test: nothing must die here
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "main task died" not in out


AGENT_CHILD = """
import asyncio, sys
import portmesh.agent.__main__ as m
async def dies(self, stop):
    await asyncio.sleep(0.5)
    raise RuntimeError("injected: the agent loop died")
m.Agent.run = dies
m.main(sys.argv[1:])
"""


def test_an_agent_whose_loop_dies_exits_1(server: str, dummy_ovs: DummyOVS, tmp_path: Path) -> None:
    """The agent's real start (store and OVSDB connections), then its loop dies: exit 1, the reason logged.

    Its loop is replaced, so it touches no interface: only its store and OVSDB clients run.
    """
    argv = [sys.executable, "-c", AGENT_CHILD, "--host", "h1", "--store", server, "--ovsdb", f"unix:{dummy_ovs.db_sock}",
            "--controller", "tcp:127.0.0.1:6653", "--state-dir", str(tmp_path / "agent"), "--docker-url", "none"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "agent for host h1 started" in out  # positive control: it got as far as running its loop
    assert proc.returncode == 1, out
    assert "main task died: RuntimeError: injected: the agent loop died" in out
    assert "exits with status 1 so its supervisor restarts it" in out
