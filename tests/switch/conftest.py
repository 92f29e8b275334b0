"""Tier 2: the real controller programming a real ovs-vswitchd on the dummy datapath."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import pytest

from portmesh.controller.service import Controller
from portmesh.lab.dummy_ovs import DummyOVS
from portmesh.model.entities import DesiredState

pytestmark = pytest.mark.switch


class MemoryState:
    """An in-memory desired-state source with the store's reporting interface (the switch stays real)."""

    def __init__(self, state: DesiredState) -> None:
        self._state = state
        self._callbacks: list[Callable[[], None]] = []
        self.reports: dict[str, tuple[int, bool]] = {}
        # Containers whose flows still wait for their port, as last reported (realised: none).
        self.waiting: dict[str, frozenset[str]] = {}
        self._cond = threading.Condition()

    def snapshot(self) -> DesiredState:
        return self._state

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def report_switch(self, host: str, generation: int, connected: bool, waiting: Collection[str] = ()) -> None:
        with self._cond:
            self.reports[host] = (generation, connected)
            self.waiting[host] = frozenset(waiting)
            self._cond.notify_all()

    def publish(self, state: DesiredState) -> int:
        """Replace the state with a new generation and notify, like a store write."""
        self._state = replace(state, generation=self._state.generation + 1)
        for cb in self._callbacks:
            cb()
        return self._state.generation

    def _realized(self, host: str, want: int) -> bool:
        generation, connected = self.reports.get(host, (-1, False))
        return connected and generation >= want and not self.waiting.get(host)

    def wait_realized(self, host: str, generation: int | None = None, timeout: float = 10.0) -> None:
        want = self._state.generation if generation is None else generation
        with self._cond:
            ok = self._cond.wait_for(lambda: self._realized(host, want), timeout)
        assert ok, f"switch of {host} did not realise generation {want}: {self.reports}"


class ControllerThread:
    """Runs the asyncio controller on its own loop in a thread, listening on a unix socket."""

    def __init__(self, source: MemoryState, socket_path: Path) -> None:
        self.source = source
        self.path = socket_path
        self.loop = asyncio.new_event_loop()
        self.controller: Controller | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> ControllerThread:
        self._thread.start()
        self.call(self._start()).result(10)
        return self

    async def _start(self) -> None:
        self.controller = Controller(self.source)
        self.controller.attach()
        self._server = await asyncio.start_unix_server(self.controller.handle_switch, str(self.path))
        self._task = asyncio.create_task(self.controller.run())

    def call(self, coro: object) -> Future[object]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def stop(self) -> None:
        async def _stop() -> None:
            if self._task:
                self._task.cancel()
            if self._server:
                self._server.close()
            assert self.controller is not None
            for sw in list(self.controller.switches.values()):
                sw.conn.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in others:
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        self.call(_stop()).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture
def dummy_ovs(tmp_path: Path) -> Iterator[DummyOVS]:
    if shutil.which("ovs-vswitchd") is None:
        pytest.skip("ovs-vswitchd not installed")
    ovs = DummyOVS(tmp_path)
    try:
        yield ovs.start()
    finally:
        ovs.stop()
