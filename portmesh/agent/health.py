"""Health checks of a mapping's backends, run by the agent of the host each backend lives on (issue 15).

For every mapping with a :class:`HealthCheck` and every one of its backends placed on this host,
one asyncio task checks the backend every ``interval`` seconds, start to start: a TCP connect to
the mapping's public IP and the check's port, or an HTTP GET of ``path`` expecting ``expect``,
all within ``timeout``. ``threshold`` failures in a row mark it ``down: <reason>``, ``threshold``
successes in a row ``up`` again (:class:`Tracker`), so a lost SYN moves no connection; a backend
whose container is not running is ``down: not running`` at once (nothing to wait for). The agent
reports to the store (``Store.report_health``) only when some backend's state changes, and once
for each backend when its first check is done (an agent restart re-asserts what it sees).

Why inside the backend's own network namespace: with direct server return every backend holds
the public IP itself, so from anywhere else the address is either ambiguous or the switch's
choice; from inside the namespace it is the backend's own local address and the check reaches
exactly that backend's service (also one that listens on the public IP only), never a sibling.
No process per check: the socket is *created* inside the namespace by a worker thread that
enters it with ``setns(2)`` (a per-thread operation on Linux) and comes straight back; a socket
stays in the namespace it was created in, so the connect and the HTTP exchange then run on the
agent's event loop like any other socket. Concurrency is bounded by a semaphore.

The local path: a container's public IPs' ``local`` routes live in table 100, consulted only for
packets arriving on eth0 (plumbing.py), so that what a container sends to its own public IP goes
out to the switch (another container may hold the same IP on another port). A check connecting
from the public IP would therefore leave through the switch too: refused on a port that is not
mapped, and on a balanced port answered by whichever backend the switch picks. So the check's
socket is bound to 127.0.0.1, and each checked namespace gets one more rule, ``pref 2 from
127.0.0.0/8 lookup 100``: traffic from a loopback address (which could never leave by eth0
anyway: the kernel refuses it, EINVAL) finds the public IPs local. The service sees the check
come from 127.0.0.1 and answers it over lo; nothing else in the container changes.

Detection bound: a service that stops just after a good check fails its next check at most
``interval`` later, and its ``threshold``-th at most ``interval * threshold`` after the stop,
plus up to ``timeout`` if the checks time out rather than being refused.

A mapping or backend that disappears (or moves to another host, or loses its check) has its task
cancelled as soon as the store's change arrives, an in-flight check included.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from portmesh.agent.plumbing import LOCAL_COPY_TABLE, netns_path
from portmesh.model.entities import ContainerStatus, DesiredState, HealthCheck, HealthKind, MappingKey, RunState

log = logging.getLogger("portmesh.agent.health")

UP = "up"
NOT_RUNNING = "not running"
CLONE_NEWNET = 0x40000000
LOOPBACK_RULE_PREF = 2  # after plumbing's pref 1 (iif eth0 lookup 100)
LOOPBACK_SRC, LOOPBACK_SRC_LEN = "127.0.0.0", 8
MAX_RESPONSE_LINE = 4096  # bytes of an HTTP status line read at most
DEFAULT_CONCURRENCY = 64  # checks in flight at once on one host

Offload = Callable[..., Awaitable[Any]]  # asyncio.to_thread, or an inline stand-in in tests


class HealthStore(Protocol):
    """What the checker needs of :class:`portmesh.store.client.Store` (the agent's view)."""

    def snapshot(self) -> DesiredState: ...

    def subscribe(self, callback: Callable[[], None]) -> None: ...

    def container_status(self, name: str) -> ContainerStatus | None: ...

    def report_health(self, host: str, results: dict[MappingKey, dict[str, str]]) -> None: ...


@dataclass(frozen=True)
class Target:
    """One backend of one mapping to check, with where (the mapping's public IP) and how."""

    key: MappingKey
    backend: str
    check: HealthCheck

    @property
    def port(self) -> int:
        """The port checked: the check's own, or the mapping's when it says 0."""
        return self.check.port or self.key.port

    def __str__(self) -> str:
        return f"{self.key} backend {self.backend}"


def targets(state: DesiredState, host: str) -> dict[tuple[MappingKey, str], Target]:
    """The checks this host runs: each backend placed on ``host`` of each mapping that has a check."""
    found: dict[tuple[MappingKey, str], Target] = {}
    for m in state.mappings.values():
        if m.health is None:
            continue
        for name in m.names:
            c = state.containers.get(name)
            if c is not None and c.host == host:
                found[(m.key, name)] = Target(m.key, name, m.health)
    return found


@dataclass
class Tracker:
    """The threshold logic of one backend: the state it is reported in, and the current streak.

    ``state`` is None until the first check, whose result is taken as it is (there is nothing to
    flap from), unless the store already held a verdict (``seed``: an agent restart keeps it and
    the threshold applies as usual). Afterwards ``threshold`` results in a row against the state
    are needed to change it. A backend already down whose reason changes (refused -> not
    running) is re-reported with the new reason.
    """

    threshold: int
    state: str | None = None
    oks: int = 0
    fails: int = 0
    checks: int = 0

    def observe(self, failure: str | None, immediate: bool = False) -> bool:
        """Count one check (``failure`` None: it passed, else why not); True if ``state`` changed.

        ``immediate``: a certain failure (the container is not running) needs no streak."""
        self.checks += 1
        before = self.state
        if failure is None:
            self.oks, self.fails = self.oks + 1, 0
            if self.state is None or (self.state != UP and self.oks >= self.threshold):
                self.state = UP
        else:
            self.oks, self.fails = 0, self.fails + 1
            down = f"down: {failure}"
            if self.state is None or immediate or self.fails >= self.threshold or self.state != UP:
                self.state = down
        return self.state != before


def _libc_setns() -> Callable[[int, int], int]:
    libc = ctypes.CDLL(None, use_errno=True)
    fn: Callable[[int, int], int] = libc.setns
    return fn


class _NotRunning(Exception):
    """The backend's container has no running process (or namespace) to check in."""


class NetnsProbe:
    """The real check: a socket made inside the backend's namespace, then connect (and GET) on the loop."""

    def __init__(self, store: HealthStore, workers: int = 2) -> None:
        self.store = store
        self._setns = _libc_setns()
        self._workers = workers
        self._executor = self._new_executor()
        # Namespaces (path, device, inode) whose loopback rule is known to be there.
        self._routed: set[tuple[str, int, int]] = set()

    def _new_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        # Threads of our own: a thread that ever failed to come back from a namespace must not be
        # one that later runs the agent's netlink work (asyncio's default executor).
        return concurrent.futures.ThreadPoolExecutor(self._workers, thread_name_prefix="pm-health-netns")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def socket_in(self, backend: str) -> socket.socket:
        """A non-blocking TCP socket bound to 127.0.0.1, created inside ``backend``'s network namespace,
        whose loopback rule is ensured first (runs in a worker thread; see the module docstring)."""
        status = self.store.container_status(backend)
        if status is None or status.state != RunState.RUNNING or not status.netns:
            raise _NotRunning()
        try:
            target = os.open(netns_path(status.netns), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise _NotRunning() from None
        try:
            st = os.fstat(target)
            ident = (status.netns, st.st_dev, st.st_ino)
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if self._setns(target, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {status.netns}: {os.strerror(err)}")
                try:
                    if ident not in self._routed:
                        ensure_loopback_rule()
                        self._routed.add(ident)
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                finally:
                    if self._setns(home, CLONE_NEWNET) != 0:
                        # This thread is stranded in the backend's namespace: never use it again.
                        log.critical("health worker could not return from %s; replacing it", status.netns)
                        old, self._executor = self._executor, self._new_executor()
                        old.shutdown(wait=False)
            finally:
                os.close(home)
        finally:
            os.close(target)
        try:
            sock.setblocking(False)
            sock.bind(("127.0.0.1", 0))
        except OSError:
            sock.close()
            raise
        return sock

    async def __call__(self, t: Target) -> str | None:
        """Check ``t`` once: None if healthy, else the reason (``connection refused``, ``timeout``, ``HTTP 503``...)."""
        failure = await self._once(t)
        if failure == "invalid argument":
            # The loopback rule went (deleted, or a new namespace that reuses a freed one's inode):
            # the kernel refuses 127.0.0.1 towards eth0. Ensure it again and check once more.
            self._routed.clear()
            failure = await self._once(t)
        return failure

    async def _once(self, t: Target) -> str | None:
        loop = asyncio.get_running_loop()
        try:
            sock = await loop.run_in_executor(self._executor, self.socket_in, t.backend)
        except _NotRunning:
            return NOT_RUNNING
        except OSError as exc:
            return f"namespace: {exc.strerror or exc}"
        try:
            async with asyncio.timeout(t.check.timeout):
                await loop.sock_connect(sock, (str(t.key.public_ip), t.port))
                if t.check.kind is HealthKind.HTTP:
                    return await _http_get(loop, sock, t)
            return None
        except TimeoutError:
            return "timeout"
        except ConnectionRefusedError:
            return "connection refused"
        except OSError as exc:
            return (exc.strerror or type(exc).__name__).lower()
        finally:
            sock.close()


def ensure_loopback_rule() -> None:
    """In the calling thread's namespace: ``pref 2 from 127.0.0.0/8 lookup 100``, unless it is there."""
    with IPRoute() as ipr:
        for rule in ipr.rule("dump", family=socket.AF_INET):
            if (rule.get("priority") == LOOPBACK_RULE_PREF and rule.get("table") == LOCAL_COPY_TABLE
                    and rule.get("src") == LOOPBACK_SRC and rule["src_len"] == LOOPBACK_SRC_LEN):
                return
        try:
            ipr.rule("add", family=socket.AF_INET, priority=LOOPBACK_RULE_PREF, src=LOOPBACK_SRC,
                     src_len=LOOPBACK_SRC_LEN, table=LOCAL_COPY_TABLE)
        except NetlinkError as exc:
            if exc.code != 17:  # EEXIST: another worker added it just now
                raise
        log.info("health: loopback rule added (pref %d from %s/%d lookup %d)", LOOPBACK_RULE_PREF, LOOPBACK_SRC,
                 LOOPBACK_SRC_LEN, LOCAL_COPY_TABLE)


async def _http_get(loop: asyncio.AbstractEventLoop, sock: socket.socket, t: Target) -> str | None:
    """GET ``path`` over the connected ``sock``; None if the status is the expected one."""
    host = f"{t.key.public_ip!s}:{t.port}"
    request = f"GET {t.check.path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: portmesh-health\r\nConnection: close\r\n\r\n"
    await loop.sock_sendall(sock, request.encode("latin-1"))
    data = b""
    while b"\r\n" not in data and b"\n" not in data and len(data) < MAX_RESPONSE_LINE:
        chunk = await loop.sock_recv(sock, MAX_RESPONSE_LINE)
        if not chunk:
            break
        data += chunk
    if not data:
        return "no HTTP response"
    parts = data.split(b"\n", 1)[0].split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return "bad HTTP response"
    status = int(parts[1])
    return None if status == t.check.expect else f"HTTP {status}"


Probe = Callable[[Target], Awaitable[str | None]]


@dataclass
class _Running:
    target: Target
    tracker: Tracker
    task: asyncio.Task[None] | None = field(default=None)


class HealthChecker:
    """Runs this host's checks (see the module docstring) and reports the verdicts on a change.

    ``probe``, ``clock``, ``sleep`` and ``offload`` (how blocking store calls leave the loop) are
    there for tests: a fake clock and scripted probes exercise the threshold and timing logic.
    """

    def __init__(
        self,
        host: str,
        store: HealthStore,
        probe: Probe | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        offload: Offload = asyncio.to_thread,
    ) -> None:
        self.host = host
        self.store = store
        self._own_probe: NetnsProbe | None = None
        if probe is None:
            probe = self._own_probe = NetnsProbe(store)
        self.probe: Probe = probe
        self._clock, self._sleep, self._offload = clock, sleep, offload
        self._limit = asyncio.Semaphore(concurrency)
        self._running: dict[tuple[MappingKey, str], _Running] = {}
        self._dirty = asyncio.Event()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.reports = 0  # report_health calls made (tests, logs)

    # -- what to check ------------------------------------------------------------------------

    def update(self, state: DesiredState) -> None:
        """Start the checks ``state`` asks of this host and cancel those it no longer asks for."""
        wanted = targets(state, self.host)
        for ident in [i for i in self._running if i not in wanted]:
            gone = self._running.pop(ident)
            if gone.task is not None:
                gone.task.cancel()
            log.info("health check of %s stopped", gone.target)
        for ident, t in wanted.items():
            run = self._running.get(ident)
            if run is not None and run.target == t:
                continue
            if run is not None:  # same backend, another check: restart it, keep what it knows
                if run.task is not None:
                    run.task.cancel()
                run.target, run.tracker.threshold = t, t.check.threshold
            else:
                run = self._running[ident] = _Running(t, Tracker(t.check.threshold, self._seed(state, t)))
                log.info("health check of %s: %s port %d every %.1f s", t, t.check.kind.value, t.port, t.check.interval)
            run.task = asyncio.ensure_future(self._check_loop(run))

    def _seed(self, state: DesiredState, t: Target) -> str | None:
        """The verdict the store already holds for ``t`` (an agent restart keeps it), if the view carries it."""
        mapping_health = getattr(self.store, "mapping_health", None)
        if mapping_health is None:
            return None
        try:
            found = mapping_health(t.key).get(t.backend)
        except Exception:
            return None
        return found if isinstance(found, str) and (found == UP or found.startswith("down: ")) else None

    def results(self) -> dict[MappingKey, dict[str, str]]:
        """Every backend's current verdict, by mapping (those not checked yet left out)."""
        out: dict[MappingKey, dict[str, str]] = {}
        for (key, backend), run in self._running.items():
            if run.tracker.state is not None and run.tracker.checks:
                out.setdefault(key, {})[backend] = run.tracker.state
        return out

    # -- the loops ------------------------------------------------------------------------------

    async def _check_loop(self, run: _Running) -> None:
        t = run.target
        while True:
            started = self._clock()
            async with self._limit:
                try:
                    failure = await self.probe(t)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a bug in a probe must not end the backend's checks
                    log.exception("health check of %s failed unexpectedly", t)
                    failure = f"check error: {type(exc).__name__}"
            first = run.tracker.checks == 0
            before = run.tracker.state
            if run.tracker.observe(failure, immediate=failure == NOT_RUNNING) or first:
                if run.tracker.state != before:
                    log.info("health: %s is %s (was %s)", t, run.tracker.state, before or "unchecked")
                self._dirty.set()
            await self._sleep(max(0.0, started + t.check.interval - self._clock()))

    def _notify(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self, stop: asyncio.Event, retry: float = 1.0) -> None:
        """Follow the store's mappings and report verdicts until ``stop``; then cancel every check."""
        self._loop = asyncio.get_running_loop()
        self.store.subscribe(self._notify)
        self._wake.set()
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                waiters = {asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(self._dirty.wait())}
                await asyncio.wait(waiters | {stopper}, return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
                if stop.is_set():
                    break
                if self._wake.is_set():
                    self._wake.clear()
                    try:
                        self.update(await self._offload(self.store.snapshot))
                    except Exception:
                        log.exception("health: reading the store failed; retrying")
                        await self._pause(stop, retry)
                        self._wake.set()
                if self._dirty.is_set():
                    self._dirty.clear()
                    results = self.results()
                    try:
                        await self._offload(self.store.report_health, self.host, results)
                        self.reports += 1
                    except Exception as exc:
                        log.warning("health: report to the store failed (%s); retrying", exc)
                        await self._pause(stop, retry)
                        self._dirty.set()
        finally:
            stopper.cancel()
            await self.close()

    async def _pause(self, stop: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    async def close(self) -> None:
        """Cancel every check (and wait for them), release the worker threads."""
        tasks = [r.task for r in self._running.values() if r.task is not None]
        self._running.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._own_probe is not None:
            self._own_probe.close()
