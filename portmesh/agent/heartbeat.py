"""The agent's lease: a counter in its Host row, bumped every ``--heartbeat-interval`` seconds.

An OVS host's death is seen at once (the controller loses the switch); an eBPF host has no switch,
its agent is what programs the datapath and what reports it connected, so without a lease a dead
agent looked alive until the API's silence rule (10 s) ran out. Like a Kubernetes node lease, the
agent proves it is alive by writing, and the reader (the API) times the writes with its own
monotonic clock: a counter, not a timestamp, so no clock is shared between machines.

The beats run beside the converge loop (a task of their own, the store write in a worker thread),
never in it: a long pass delays no beat, and a slow store delays no pass. A beat that fails is
logged and the next one tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 1.0  # seconds between beats; the API's lease defaults to 3 of them


class HeartbeatStore(Protocol):
    """The store verb the heartbeat needs (:meth:`portmesh.store.client.Store.report_heartbeat`)."""

    def report_heartbeat(self, host: str, beat: int, datapath: str | None = None) -> None: ...


class Heartbeat:
    """Bumps ``host``'s heartbeat every ``interval`` seconds until stopped; says ``datapath`` with the beats."""

    def __init__(self, host: str, store: HeartbeatStore, datapath: str, interval: float = DEFAULT_INTERVAL) -> None:
        if interval <= 0:
            raise ValueError(f"heartbeat interval must be positive, not {interval}")
        self.host, self.store, self.datapath, self.interval = host, store, datapath, interval
        # Start from the wall clock's seconds: a restarted agent's first beat differs from the last one
        # its predecessor wrote (any change is a beat to the reader; only the moves are timed, not the value).
        self.beat = int(time.time())
        self.failures = 0  # consecutive failed beats (each one logged)

    def once(self) -> None:
        """One beat (blocking: a store round trip)."""
        self.beat += 1
        self.store.report_heartbeat(self.host, self.beat, self.datapath)

    async def run(self, stop: asyncio.Event) -> None:
        """Beat until ``stop``: each beat in a worker thread, then wait out the rest of the interval."""
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            started = loop.time()
            try:
                await asyncio.to_thread(self.once)
            except Exception as exc:
                self.failures += 1
                log.warning("heartbeat of host %s failed (%d in a row; next in %gs): %s: %s",
                            self.host, self.failures, self.interval, type(exc).__name__, exc)
            else:
                if self.failures:
                    log.info("heartbeat of host %s written again after %d failed", self.host, self.failures)
                self.failures = 0
            pause = max(0.0, self.interval - (loop.time() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
