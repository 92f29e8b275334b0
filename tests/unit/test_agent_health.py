"""The agent's health checks (portmesh/agent/health.py) without a lab: the threshold logic, the
checker's scheduling and reporting on a fake clock with scripted probes, and the real probe
(TCP connect, HTTP GET) against listeners in this process's own namespace."""

from __future__ import annotations

import asyncio
import heapq
import http.server
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from ipaddress import IPv4Address
from typing import Any

import pytest

from portmesh.agent.health import NOT_RUNNING, UP, HealthChecker, NetnsProbe, Target, Tracker, targets
from portmesh.model.entities import (
    Backend,
    Container,
    ContainerStatus,
    DesiredState,
    HealthCheck,
    HealthKind,
    Host,
    Mapping,
    MappingKey,
    PortBlock,
    Proto,
    RunState,
)

KEY = MappingKey(IPv4Address("203.0.113.10"), Proto.TCP, 80)
KEY2 = MappingKey(IPv4Address("203.0.113.11"), Proto.TCP, 80)
CHECK = HealthCheck(HealthKind.TCP, interval=2.0, timeout=1.0, threshold=3)


def container(name: str, host: str = "h1", ip: str = "203.0.113.10") -> Container:
    return Container(name, host, "02:00:00:00:00:01", (IPv4Address(ip),), PortBlock(32768, 64))


def mapping(key: MappingKey, names: list[str], check: HealthCheck | None = CHECK) -> Mapping:
    return Mapping(key, names[0], tuple(Backend(n) for n in names), health=check)


def state(mappings: list[Mapping], containers: list[Container]) -> DesiredState:
    return DesiredState(1, {"h1": Host("h1", 1), "h2": Host("h2", 2)}, {c.name: c for c in containers},
                        {m.key: m for m in mappings})


class FakeClock:
    """Monotonic time that moves only when the test says so; sleepers wake in due order."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._n = 0

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, self._n, fut))
        self._n += 1
        await fut

    async def advance(self, seconds: float) -> None:
        end = self.now + seconds
        await settle()
        while self._sleepers and self._sleepers[0][0] <= end:
            due, _, fut = heapq.heappop(self._sleepers)
            self.now = max(self.now, due)
            if not fut.done():
                fut.set_result(None)
            await settle()
        self.now = end
        await settle()


async def settle() -> None:
    for _ in range(30):
        await asyncio.sleep(0)


async def inline(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


class Store:
    """The checker's side of the store: a snapshot, subscribers, and the reports it receives."""

    def __init__(self, st: DesiredState) -> None:
        self.state = st
        self.callbacks: list[Callable[[], None]] = []
        self.reports: list[tuple[float, dict[MappingKey, dict[str, str]]]] = []
        self.clock: FakeClock | None = None
        self.health: dict[MappingKey, dict[str, str]] = {}
        self.fail_reports = 0

    def snapshot(self) -> DesiredState:
        return self.state

    def subscribe(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def change(self, st: DesiredState) -> None:
        self.state = st
        for cb in self.callbacks:
            cb()

    def container_status(self, name: str) -> ContainerStatus | None:
        return None

    def mapping_health(self, key: MappingKey) -> dict[str, str]:
        return dict(self.health.get(key, {}))

    def report_health(self, host: str, results: dict[MappingKey, dict[str, str]]) -> None:
        if self.fail_reports:
            self.fail_reports -= 1
            raise RuntimeError("store away")
        assert host == "h1"
        self.reports.append((self.clock.now if self.clock else 0.0, {k: dict(v) for k, v in results.items()}))

    @property
    def last(self) -> dict[MappingKey, dict[str, str]]:
        return self.reports[-1][1]


class Probes:
    """Scripted probe: each backend answers what ``result`` says now (None = healthy); calls recorded."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.result: dict[str, str | None] = {}
        self.calls: list[tuple[float, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.hold: asyncio.Event | None = None

    async def __call__(self, t: Target) -> str | None:
        self.calls.append((self.clock.now, t.backend))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold is not None:
                await self.hold.wait()
            return self.result.get(t.backend)
        finally:
            self.in_flight -= 1

    def times(self, backend: str) -> list[float]:
        return [t for t, b in self.calls if b == backend]


class Rig:
    def __init__(self, st: DesiredState, concurrency: int = 64) -> None:
        self.clock = FakeClock()
        self.store = Store(st)
        self.store.clock = self.clock
        self.probes = Probes(self.clock)
        self.checker = HealthChecker("h1", self.store, self.probes, concurrency=concurrency,
                                     clock=self.clock.time, sleep=self.clock.sleep, offload=inline)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Rig:
        self.task = asyncio.ensure_future(self.checker.run(self.stop))
        await settle()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- the threshold logic ---------------------------------------------------------------------------


def test_first_result_is_taken_then_a_streak_of_threshold_is_needed() -> None:
    t = Tracker(threshold=3)
    assert t.observe(None) and t.state == UP
    assert not t.observe("timeout") and not t.observe("timeout") and t.state == UP
    assert not t.observe(None)  # a good check breaks the streak
    assert not t.observe("connection refused") and not t.observe("connection refused")
    assert t.observe("connection refused") and t.state == "down: connection refused"
    assert not t.observe(None) and not t.observe(None) and t.state == "down: connection refused"
    assert t.observe("timeout")  # the streak back up starts again; the new reason is reported
    assert t.state == "down: timeout"
    assert not t.observe(None) and not t.observe(None)
    assert t.observe(None) and t.state == UP


def test_first_failure_is_taken_as_it_is() -> None:
    t = Tracker(threshold=2)
    assert t.observe("HTTP 503") and t.state == "down: HTTP 503"
    assert not t.observe(None) and t.observe(None) and t.state == UP


def test_not_running_is_down_at_once_and_a_new_reason_is_reported() -> None:
    t = Tracker(threshold=3, state=UP)
    assert t.observe(NOT_RUNNING, immediate=True) and t.state == "down: not running"
    assert t.observe("connection refused") and t.state == "down: connection refused"
    assert not t.observe("connection refused")


def test_a_seeded_verdict_is_kept_until_a_streak() -> None:
    t = Tracker(threshold=2, state=UP)
    assert not t.observe("timeout") and t.state == UP  # an agent restart during a blip does not flap
    assert t.observe("timeout") and t.state == "down: timeout"


def test_targets_are_this_hosts_backends_of_checked_mappings() -> None:
    st = state([mapping(KEY, ["a", "b", "c"]), mapping(KEY2, ["d"], check=None)],
               [container("a"), container("b", "h2"), container("c"), container("d")])
    found = targets(st, "h1")
    assert set(found) == {(KEY, "a"), (KEY, "c")}
    assert found[(KEY, "a")].port == 80
    assert Target(KEY, "a", replace(CHECK, port=8080)).port == 8080


# -- the checker on a fake clock -------------------------------------------------------------------


def test_reports_once_at_start_then_only_on_change_with_detection_within_bound() -> None:
    async def main() -> None:
        st = state([mapping(KEY, ["a", "b"])], [container("a"), container("b")])
        async with Rig(st) as rig:
            await rig.clock.advance(0)
            assert rig.store.last == {KEY: {"a": UP, "b": UP}}
            await rig.clock.advance(20)
            assert len(rig.store.reports) == 1  # steady: nothing written
            assert rig.probes.times("a") == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0, 20.0]
            stopped_at = 20.5
            await rig.clock.advance(0.5)
            rig.probes.result["a"] = "connection refused"
            await rig.clock.advance(10)
            assert len(rig.store.reports) == 2
            at, results = rig.store.reports[1]
            assert results == {KEY: {"a": "down: connection refused", "b": UP}}
            # failed checks at 22, 24, 26: detected interval*threshold - 0.5 after the stop
            assert at - stopped_at <= CHECK.interval * CHECK.threshold + CHECK.timeout
            assert at == 26.0
            rig.probes.result["a"] = None  # at 30.5: good checks at 32, 34, 36
            await rig.clock.advance(6)
            assert rig.store.last == {KEY: {"a": UP, "b": UP}} and rig.store.reports[-1][0] == 36.0
            assert len(rig.store.reports) == 3
    run(main())


def test_a_not_running_container_is_down_at_its_next_check() -> None:
    async def main() -> None:
        async with Rig(state([mapping(KEY, ["a"])], [container("a")])) as rig:
            await rig.clock.advance(1)
            rig.probes.result["a"] = NOT_RUNNING
            await rig.clock.advance(1)
            assert rig.store.reports[-1] == (2.0, {KEY: {"a": "down: not running"}})
    run(main())


def test_checks_of_vanished_mappings_and_backends_stop_at_once() -> None:
    async def main() -> None:
        cs = [container("a"), container("b"), container("c", ip="203.0.113.11")]
        st = state([mapping(KEY, ["a", "b"]), mapping(KEY2, ["c"])], cs)
        rig = Rig(st)
        rig.probes.hold = asyncio.Event()  # every check in flight
        async with rig:
            await rig.clock.advance(0)
            assert rig.probes.in_flight == 3
            rig.store.change(state([mapping(KEY, ["a"]), mapping(KEY2, ["c"], check=None)], cs))
            await settle()
            assert rig.probes.in_flight == 1  # b's and c's in-flight checks were cancelled
            rig.probes.hold.set()
            await rig.clock.advance(10)
            assert rig.probes.times("b") == [0.0] and rig.probes.times("c") == [0.0]
            assert rig.probes.times("a")[-1] == 10.0
            assert rig.store.last == {KEY: {"a": UP}}
            rig.store.change(state([], cs))
            await rig.clock.advance(10)
            assert rig.probes.times("a")[-1] == 10.0
            assert not rig.checker._running
    run(main())


def test_a_changed_check_restarts_with_its_new_interval_keeping_the_verdict() -> None:
    async def main() -> None:
        cs = [container("a")]
        async with Rig(state([mapping(KEY, ["a"])], cs)) as rig:
            await rig.clock.advance(3)
            rig.store.change(state([mapping(KEY, ["a"], replace(CHECK, interval=0.5))], cs))
            await rig.clock.advance(1)
            assert rig.probes.times("a") == [0.0, 2.0, 3.0, 3.5, 4.0]
            assert len(rig.store.reports) == 1  # same verdict, nothing new to write
    run(main())


def test_a_backend_moved_to_another_host_is_no_longer_checked_here() -> None:
    async def main() -> None:
        async with Rig(state([mapping(KEY, ["a"])], [container("a")])) as rig:
            await rig.clock.advance(0)
            rig.store.change(state([mapping(KEY, ["a"])], [container("a", "h2")]))
            await rig.clock.advance(10)
            assert rig.probes.times("a") == [0.0]
    run(main())


def test_concurrency_is_bounded() -> None:
    async def main() -> None:
        names = [f"b{i}" for i in range(10)]
        rig = Rig(state([mapping(KEY, names)], [container(n) for n in names]), concurrency=3)
        rig.probes.hold = asyncio.Event()
        async with rig:
            await rig.clock.advance(0)
            assert rig.probes.in_flight == 3
            rig.probes.hold.set()
            await rig.clock.advance(0)
            assert rig.probes.max_in_flight == 3 and len(rig.probes.calls) == 10
            assert rig.store.last == {KEY: {n: UP for n in names}}
    run(main())


def test_a_verdict_already_in_the_store_is_kept_across_an_agent_restart() -> None:
    async def main() -> None:
        st = state([mapping(KEY, ["a"])], [container("a")])
        rig = Rig(st)
        rig.store.health = {KEY: {"a": UP}}
        rig.probes.result["a"] = "timeout"
        async with rig:
            await rig.clock.advance(0)
            assert rig.store.last == {KEY: {"a": UP}}  # once at start, one blip is no verdict
            await rig.clock.advance(4)
            assert rig.store.last == {KEY: {"a": "down: timeout"}} and rig.store.reports[-1][0] == 4.0
    run(main())


def test_a_failed_report_is_retried() -> None:
    async def main() -> None:
        rig = Rig(state([mapping(KEY, ["a"])], [container("a")]))
        rig.store.fail_reports = 1
        async with rig:
            await rig.clock.advance(0)
            assert rig.store.reports == []
            for _ in range(100):
                if rig.store.reports:
                    break
                await asyncio.sleep(0.02)  # the retry pause is real time
            assert rig.store.last == {KEY: {"a": UP}}
    run(main())


# -- the real probe, in this process's own namespace ------------------------------------------------


class StatusStore:
    def __init__(self, status: ContainerStatus | None) -> None:
        self.status = status

    def container_status(self, name: str) -> ContainerStatus | None:
        return self.status


HERE = ContainerStatus(RunState.RUNNING, "/proc/self/ns/net", 1)


@pytest.fixture
def http_server() -> Iterator[tuple[int, list[int]]]:
    codes = [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(codes[0] if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], codes
    finally:
        server.shutdown()
        server.server_close()


def probe_once(status: ContainerStatus | None, port: int, check: HealthCheck) -> str | None:
    probe = NetnsProbe(StatusStore(status))  # type: ignore[arg-type]
    try:
        key = MappingKey(IPv4Address("127.0.0.1"), Proto.TCP, port)
        result: str | None = asyncio.run(probe(Target(key, "a", check)))
        return result
    finally:
        probe.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_probe_tcp_connect_and_refused(http_server: tuple[int, list[int]]) -> None:
    port, _ = http_server
    assert probe_once(HERE, port, CHECK) is None
    assert probe_once(HERE, free_port(), CHECK) == "connection refused"


def test_probe_http_status(http_server: tuple[int, list[int]]) -> None:
    port, codes = http_server
    check = HealthCheck(HealthKind.HTTP, path="/health", expect=200, timeout=2.0)
    assert probe_once(HERE, port, check) is None
    codes[0] = 503
    assert probe_once(HERE, port, check) == "HTTP 503"
    assert probe_once(HERE, port, replace(check, expect=503)) is None
    assert probe_once(HERE, port, replace(check, path="/other")) == "HTTP 404"


def test_probe_timeout_when_nothing_answers() -> None:
    with socket.socket() as listener:  # accepts (the kernel does), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        check = HealthCheck(HealthKind.HTTP, timeout=0.2)
        assert probe_once(HERE, listener.getsockname()[1], check) == "timeout"


def test_probe_not_running() -> None:
    assert probe_once(None, 80, CHECK) == NOT_RUNNING
    assert probe_once(ContainerStatus(RunState.EXITED, "/proc/self/ns/net"), 80, CHECK) == NOT_RUNNING
    assert probe_once(ContainerStatus(RunState.RUNNING, "pm-no-such-netns-x"), 80, CHECK) == NOT_RUNNING
