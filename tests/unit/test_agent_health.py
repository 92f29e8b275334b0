"""The agent's health checks (portmesh/agent/health.py) without a lab: the threshold logic, the
checker's scheduling and reporting on a fake clock with scripted probes, and the real probe
(TCP connect, HTTP GET) in a scratch namespace plumbed like a container's."""

from __future__ import annotations

import asyncio
import ctypes
import heapq
import http.server
import os
import queue
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from ipaddress import IPv4Address
from typing import Any, TypeVar

import pytest
from pyroute2 import IPRoute

from portmesh.agent.health import NOT_RUNNING, UP, HealthChecker, NetnsProbe, Target, Tracker, targets
from portmesh.agent.service import Agent
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

T = TypeVar("T")
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


# -- the real probe, in a scratch namespace plumbed like a container's ----------------------------

PUBLIC = "203.0.113.99"


class Scratch:
    """A thread that entered a fresh unnamed network namespace plumbed as plumbing.py plumbs a container
    (public IP /32 on eth0, its local route moved to table 100, ``pref 1 iif eth0 lookup 100``,
    nonlocal bind, default route out of eth0), running what it is given in there; nothing to clean up."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]] | None] = queue.Queue()
        ready: queue.Queue[Any] = queue.Queue()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        got = ready.get(timeout=10)
        if isinstance(got, BaseException):
            raise got
        self.path: str = got

    def _run(self, ready: queue.Queue[Any]) -> None:
        try:
            if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:  # CLONE_NEWNET, this thread only
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                ipr.link("add", ifname="eth0", kind="veth", peer="p0")
                eth0 = ipr.link_lookup(ifname="eth0")[0]
                for name in ("eth0", "p0"):
                    ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
                ipr.addr("add", index=eth0, address=PUBLIC, prefixlen=32)
                ipr.route("add", dst="169.254.1.1/32", oif=eth0, scope=253)
                ipr.route("add", dst="0.0.0.0/0", gateway="169.254.1.1", oif=eth0, flags=4)
                ipr.route("add", dst=f"{PUBLIC}/32", table=100, type=2, oif=eth0, scope=254)
                ipr.route("del", dst=f"{PUBLIC}/32", table=255, type=2, oif=eth0, scope=254, proto=2)
                ipr.rule("add", family=socket.AF_INET, priority=1, iifname="eth0", table=100)
            with open("/proc/sys/net/ipv4/ip_nonlocal_bind", "w") as f:
                f.write("1")
            ready.put(f"/proc/{os.getpid()}/task/{threading.get_native_id()}/ns/net")
        except BaseException as exc:
            ready.put(exc)
            return
        while (job := self._jobs.get()) is not None:
            fn, out = job
            try:
                out.put(fn())
            except BaseException as exc:
                out.put(exc)

    def call(self, fn: Callable[[], T]) -> T:
        out: queue.Queue[Any] = queue.Queue()
        self._jobs.put((fn, out))
        got = out.get(timeout=10)
        if isinstance(got, BaseException):
            raise got
        result: T = got
        return result

    def rules(self) -> list[tuple[Any, Any, Any]]:
        def dump() -> list[tuple[Any, Any, Any]]:
            with IPRoute() as ipr:
                return [(r.get("priority"), r.get("src"), r.get("table")) for r in ipr.rule("dump", family=socket.AF_INET)]
        return self.call(dump)

    def close(self) -> None:
        self._jobs.put(None)
        self.thread.join(10)


class StatusStore:
    def __init__(self, status: ContainerStatus | None) -> None:
        self.status = status

    def container_status(self, name: str) -> ContainerStatus | None:
        return self.status


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a scratch network namespace)")


@pytest.fixture
def scratch() -> Iterator[tuple[Scratch, list[int]]]:
    """The namespace, serving HTTP on the public IP only (port 8000: /health answers codes[0]), and
    a listener that never answers on 8001."""
    codes = [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(codes[0] if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        def server_bind(self) -> None:  # no getfqdn(): there is no resolver in the scratch namespace
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = PUBLIC, 8000

    ns = Scratch()
    server = ns.call(lambda: Server((PUBLIC, 8000), Handler))
    mute = ns.call(lambda: socket.create_server((PUBLIC, 8001)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ns, codes
    finally:
        server.shutdown()
        server.server_close()
        mute.close()
        ns.close()


def probe_once(status: ContainerStatus | None, port: int, check: HealthCheck) -> str | None:
    probe = NetnsProbe(StatusStore(status))  # type: ignore[arg-type]
    try:
        key = MappingKey(IPv4Address(PUBLIC), Proto.TCP, port)
        result: str | None = asyncio.run(probe(Target(key, "a", check)))
        return result
    finally:
        probe.close()


def running(ns: Scratch) -> ContainerStatus:
    return ContainerStatus(RunState.RUNNING, ns.path, 1)


LOOPBACK_RULE = (2, "127.0.0.0", 100)


@needs_root
def test_probe_reaches_a_service_on_the_public_ip_only_through_the_loopback_rule(
        scratch: tuple[Scratch, list[int]]) -> None:
    ns, _ = scratch
    assert LOOPBACK_RULE not in ns.rules()
    # Without the rule the public IP is not local from inside: a connect leaves by eth0 (nobody answers).
    def plain() -> str:
        with socket.socket() as s:
            s.settimeout(0.3)
            try:
                s.connect((PUBLIC, 8000))
                return "connected"
            except OSError as exc:
                return type(exc).__name__
    assert ns.call(plain) == "TimeoutError"
    assert probe_once(running(ns), 8000, CHECK) is None
    assert ns.rules().count(LOOPBACK_RULE) == 1
    assert ns.call(plain) == "TimeoutError"  # the container's own traffic to its IP still goes to the switch
    assert probe_once(running(ns), 8000, CHECK) is None
    assert ns.rules().count(LOOPBACK_RULE) == 1  # ensured once
    # Refused at once (locally), not a timeout through eth0.
    assert probe_once(running(ns), 8002, CHECK) == "connection refused"


@needs_root
def test_probe_http_status(scratch: tuple[Scratch, list[int]]) -> None:
    ns, codes = scratch
    check = HealthCheck(HealthKind.HTTP, port=8000, path="/health", expect=200, timeout=2.0)
    assert probe_once(running(ns), 80, check) is None
    codes[0] = 503
    assert probe_once(running(ns), 80, check) == "HTTP 503"
    assert probe_once(running(ns), 80, replace(check, expect=503)) is None
    assert probe_once(running(ns), 80, replace(check, path="/other")) == "HTTP 404"


@needs_root
def test_probe_timeout_when_nothing_answers(scratch: tuple[Scratch, list[int]]) -> None:
    ns, _ = scratch
    assert probe_once(running(ns), 8001, HealthCheck(HealthKind.HTTP, timeout=0.2)) == "timeout"


def test_probe_not_running() -> None:
    assert probe_once(None, 80, CHECK) == NOT_RUNNING
    assert probe_once(ContainerStatus(RunState.EXITED, "/proc/self/ns/net"), 80, CHECK) == NOT_RUNNING
    assert probe_once(ContainerStatus(RunState.RUNNING, "pm-no-such-netns-x"), 80, CHECK) == NOT_RUNNING


# -- supervision: health checks that die take the agent down (exit 1) ------------------------------


def test_an_agent_whose_health_checks_die_exits_1(monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    import portmesh.agent.__main__ as m

    class Nothing:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def start(self) -> None:
            pass

        def close(self) -> None:
            pass

    async def converge_until_stopped(self: Any, stop: asyncio.Event) -> None:
        await stop.wait()

    async def checks_die(self: Any, stop: asyncio.Event) -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("injected: the health checks died")

    monkeypatch.setattr(m, "Store", Nothing)
    monkeypatch.setattr(m, "Bridge", Nothing)
    monkeypatch.setattr(Agent, "run", converge_until_stopped)
    monkeypatch.setattr(HealthChecker, "run", checks_die)
    monkeypatch.setattr(HealthChecker, "__init__", lambda self, host, store: None)
    args = m.parse_args(["--host", "h1", "--store", "unix:/nonexistent", "--ovsdb", "unix:/nonexistent",
                         "--controller", "tcp:127.0.0.1:6653", "--state-dir", str(tmp_path), "--docker-url", "none"])
    with pytest.raises(SystemExit) as exited:
        asyncio.run(m.serve(args))
    assert exited.value.code == 1
    assert "health checks died: RuntimeError: injected: the health checks died" in caplog.text
