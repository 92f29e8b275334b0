"""The controller notices a switch that stops answering, by echo requests (issue 13).

A frozen ovs-vswitchd keeps its connection open, so no TCP error ever tells the
controller. With echo probing the controller sends ECHO_REQUEST after ``idle``
seconds of silence and drops the connection when no answer comes within
``timeout``, reporting the switch disconnected; once the switch runs again it
reconnects and the controller resyncs it with zero flow-mods (its flows never
changed).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import time
from pathlib import Path

import pytest

from portmesh.controller.connection import OpenFlowConnection
from portmesh.controller.service import Controller
from portmesh.lab.dummy_ovs import DummyOVS
from tests.switch.conftest import ControllerThread, MemoryState
from tests.switch.test_pipeline_trace import build_state

IDLE = 0.5
TIMEOUT = 0.5
SLACK = 2.0


class ProbingControllerThread(ControllerThread):
    """The test controller with short echo idle/timeout values."""

    async def _start(self) -> None:
        self.controller = Controller(self.source, echo_idle=IDLE, echo_timeout=TIMEOUT)
        self.controller.attach()
        self._server = await asyncio.start_unix_server(self.controller.handle_switch, str(self.path))
        self._task = asyncio.create_task(self.controller.run())


def _vswitchd_pid(ovs: DummyOVS) -> int:
    """The PID of the ovs-vswitchd this test's fixture started (never one found by name)."""
    procs = [p for p in ovs.procs if isinstance(p.args, list) and p.args[0] == "ovs-vswitchd"]
    assert len(procs) == 1 and procs[0].poll() is None, ovs.procs
    return procs[0].pid


def test_frozen_switch_is_reported_disconnected_and_resyncs_with_no_flow_mods(
    dummy_ovs: DummyOVS, tmp_path: Path
) -> None:
    state = build_state()
    source = MemoryState(state)
    ctl = ProbingControllerThread(source, tmp_path / "ctl.sock").start()
    pid = _vswitchd_pid(dummy_ovs)
    frozen = False
    try:
        dummy_ovs.add_bridge("br0", 1, f"unix:{tmp_path / 'ctl.sock'}")
        for i, c in enumerate(sorted(state.containers.values(), key=lambda c: c.name), start=1):
            dummy_ovs.add_port("br0", c.port_name, i)
        generation = source.publish(state)
        source.wait_realized("h1", generation)
        controller = ctl.controller
        assert controller is not None
        installed = controller.flow_mods
        assert installed > 0  # positive control for the zero below: the counter counts
        flows_before = sorted(dummy_ovs.dump_flows("br0"))

        def disconnected() -> bool:
            return not source.reports.get("h1", (-1, False))[1]

        # A live, idle switch answers the probes: over several idle+timeout spans it stays connected.
        with source._cond:
            assert not source._cond.wait_for(disconnected, 3 * (IDLE + TIMEOUT)), source.reports

        os.kill(pid, signal.SIGSTOP)
        frozen = True
        stopped_at = time.monotonic()
        with source._cond:
            assert source._cond.wait_for(disconnected, IDLE + TIMEOUT + SLACK), source.reports
        took = time.monotonic() - stopped_at
        assert took >= 0.9 * TIMEOUT, took  # not before an echo request has gone unanswered for timeout
        assert ctl.call(_switch_count(controller)).result(5) == 0

        os.kill(pid, signal.SIGCONT)
        frozen = False
        source.wait_realized("h1", generation, timeout=30)
        assert controller.flow_mods == installed, (installed, controller.flow_mods)
        assert sorted(dummy_ovs.dump_flows("br0")) == flows_before
    finally:
        if frozen:
            os.kill(pid, signal.SIGCONT)
        ctl.stop()


async def _switch_count(controller: Controller) -> int:
    """How many switches the controller holds, read on its own loop."""
    return len(controller.switches)


async def _pair() -> tuple[OpenFlowConnection, asyncio.StreamReader, asyncio.StreamWriter]:
    """A controller-side connection and the raw other end (the "switch"), over a socketpair."""
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    peer_reader, peer_writer = await asyncio.open_connection(sock=theirs)
    return OpenFlowConnection(reader, writer), peer_reader, peer_writer


async def _ignore(msg: object) -> None:
    del msg


def test_silent_peer_is_dropped_by_keepalive() -> None:
    async def run() -> float:
        conn, _peer_reader, peer_writer = await _pair()
        serving = asyncio.create_task(conn.serve(_ignore))
        start = time.monotonic()
        await asyncio.wait_for(conn.keepalive(0.2, 0.2), 5)
        with pytest.raises(asyncio.IncompleteReadError):
            await asyncio.wait_for(serving, 5)  # the abort ends the reader too, as a TCP error would
        peer_writer.close()
        return time.monotonic() - start

    took = asyncio.run(run())
    assert 0.35 <= took < 2.0, took


def test_peer_that_talks_but_never_answers_echo_is_kept() -> None:
    """Any message is a sign of life: a switch busy sending (but slow to echo) is not dropped."""

    async def run() -> bool:
        conn, _peer_reader, peer_writer = await _pair()
        serving = asyncio.create_task(conn.serve(_ignore))
        alive = asyncio.create_task(conn.keepalive(0.2, 0.2))

        async def chatter() -> None:
            for xid in range(1, 100):
                peer_writer.write(struct.pack("!BBHI", 4, 0, 8, xid))  # OFPT_HELLO: not an echo reply
                await asyncio.sleep(0.05)

        talking = asyncio.create_task(chatter())
        await asyncio.sleep(1.5)  # the observation window: several idle+timeout spans
        kept = not alive.done() and not serving.done()
        for task in (talking, alive, serving):
            task.cancel()
        await asyncio.gather(talking, alive, serving, return_exceptions=True)
        conn.close()
        peer_writer.close()
        return kept

    assert asyncio.run(run())
