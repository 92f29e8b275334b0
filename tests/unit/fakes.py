"""An in-memory stand-in for :class:`portmesh.store.client.Store` (same methods, same errors).

Thread-safe like the real one (the API calls it from worker threads). Writes bump
the generation and notify subscribers; with ``auto_converge`` every host reports
the new generation at once, as a lab whose switches and agents keep up would.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Collection, Sequence
from collections.abc import Mapping as MappingABC

from portmesh.model.config import NetworkConfig
from portmesh.model.entities import (
    Container,
    ContainerStatus,
    DesiredState,
    Host,
    HostStatus,
    Mapping,
    MappingCounters,
    MappingKey,
    RunState,
)
from portmesh.model.errors import Conflict, NotFound


class FakeStore:
    def __init__(self, auto_converge: bool = False) -> None:
        self.auto_converge = auto_converge
        self._lock = threading.RLock()
        self._state = DesiredState()
        self._running: dict[str, bool] = {}
        self._status: dict[str, ContainerStatus] = {}
        self._hosts: dict[str, HostStatus] = {}
        self._subscribers: list[Callable[[], None]] = []
        self.writes = 0
        self.down: set[str] = set()  # hosts auto_converge leaves alone (a dead machine)
        self.health: dict[MappingKey, dict[str, str]] = {}  # as agents report it (backend_health)
        self.counters: dict[MappingKey, MappingCounters] = {}  # as the master controller writes them
        self.drops: dict[str, dict[str, int]] = {}  # host -> reason -> packets, as an eBPF agent reports them

    # --- lifecycle ---

    def start(self, timeout: float = 10.0) -> None:
        pass

    def close(self) -> None:
        pass

    def snapshot(self) -> DesiredState:
        with self._lock:
            s = self._state
            return DesiredState(s.generation, dict(s.hosts), dict(s.containers), dict(s.mappings), s.config)

    def subscribe(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._subscribers.append(callback)

    def _notify(self) -> None:
        for cb in list(self._subscribers):
            cb()

    def _commit(self, **changes: object) -> int:
        with self._lock:
            gen = self._state.generation + 1
            self._state = dataclasses.replace(self._state, generation=gen, **changes)  # type: ignore[arg-type]
            self.writes += 1
            if self.auto_converge:
                for name in self._state.hosts:
                    if name in self.down:
                        continue  # a dead host: its switch and agent report nothing any more
                    old = self._hosts.get(name, HostStatus())
                    self._hosts[name] = dataclasses.replace(
                        old, switch_generation=gen, agent_generation=gen, switch_connected=True, switch_waiting=frozenset()
                    )
                self._report_containers()
        self._notify()
        return gen

    # --- writes ---

    def add_host(self, host: Host, may_exist: bool = False) -> int:
        with self._lock:
            if host.name in self._state.hosts and not may_exist:
                raise Conflict("name", f"host {host.name!r} exists")
            return self._commit(hosts={**self._state.hosts, host.name: host})

    def remove_host(self, name: str, if_exists: bool = False) -> int:
        with self._lock:
            if name not in self._state.hosts:
                if if_exists:
                    return self._state.generation
                raise NotFound("name", f"host {name!r} does not exist")
            return self._commit(hosts={k: v for k, v in self._state.hosts.items() if k != name})

    def set_config(self, config: NetworkConfig) -> int:
        """As the store's Global row: the whole config in one write (no check: the API checks)."""
        with self._lock:
            return self._commit(config=config)

    def add_container(self, c: Container, mappings: Sequence[Mapping] = ()) -> int:
        with self._lock:
            if c.name in self._state.containers:
                raise Conflict("name", f"container {c.name!r} exists")
            for m in mappings:
                if m.key in self._state.mappings:
                    raise Conflict("port", f"{m.key} is mapped")
            self._running[c.name] = True
            return self._commit(
                containers={**self._state.containers, c.name: c},
                mappings={**self._state.mappings, **{m.key: m for m in mappings}},
            )

    def remove_container(self, name: str, if_exists: bool = False) -> int:
        with self._lock:
            if name not in self._state.containers:
                if if_exists:
                    return self._state.generation
                raise NotFound("name", f"container {name!r} does not exist")
            self._running.pop(name, None)
            self._status.pop(name, None)
            mappings = {}
            for k, m in self._state.mappings.items():
                if name not in m.names:
                    mappings[k] = m
                elif len(m.backends) > 1:  # as the store: taken out of a mapping with others
                    rest = tuple(b for b in m.backends if b.container != name)
                    mappings[k] = dataclasses.replace(m, container=rest[0].container, backends=rest)
            return self._commit(
                containers={k: v for k, v in self._state.containers.items() if k != name},
                mappings=mappings,
            )

    def add_mapping(self, m: Mapping) -> int:
        with self._lock:
            if m.key in self._state.mappings:
                raise Conflict("port", f"{m.key} is mapped")
            for name in m.names:
                if name not in self._state.containers:
                    raise NotFound("container", f"container {name!r} does not exist")
            return self._commit(mappings={**self._state.mappings, m.key: m})

    def remove_mapping(self, key: MappingKey, if_exists: bool = False) -> int:
        with self._lock:
            if key not in self._state.mappings:
                if if_exists:
                    return self._state.generation
                raise NotFound("mapping", f"{key} is not mapped")
            return self._commit(mappings={k: m for k, m in self._state.mappings.items() if k != key})

    def update_mapping(self, key: MappingKey, change: Callable[[Mapping], Mapping]) -> int:
        """As the store: read the row, apply ``change``, check new backends exist, one write."""
        with self._lock:
            old = self._state.mappings.get(key)
            if old is None:
                raise NotFound("mapping", f"{key} is not mapped")
            new = change(old)
            for name in new.names:
                if name not in self._state.containers:
                    raise NotFound("container", f"container {name!r} does not exist")
            return self._commit(mappings={**self._state.mappings, key: new})

    def mapping_health(self, key: MappingKey) -> dict[str, str]:
        with self._lock:
            return dict(self.health.get(key, {}))

    def mapping_counters(self, key: MappingKey) -> MappingCounters:
        with self._lock:
            return self.counters.get(key, MappingCounters())

    def set_container_running(self, name: str, running: bool, stop_timeout: int | None = None) -> int:
        with self._lock:
            if name not in self._state.containers:
                raise NotFound("name", f"container {name!r} does not exist")
            was = self._running.get(name, False)
            self._running[name] = running
            c = self._state.containers[name]
            if stop_timeout is not None:
                c = dataclasses.replace(c, stop_timeout=stop_timeout)
            status = self._status.get(name)
            if running and status is not None and status.state in (RunState.EXITED, RunState.ERROR):
                c = dataclasses.replace(c, starts=c.starts + 1)  # as the store: a start asked for
            if c != self._state.containers[name]:
                return self._commit(containers={**self._state.containers, name: c})
            if was == running:  # as the store: an unchanged run state writes nothing
                return self._state.generation
            return self._commit()

    # --- status (reported by agents and the controller; no generation bump) ---

    def container_running(self, name: str) -> bool:
        with self._lock:
            return self._running.get(name, False)

    def report_container_status(self, name: str, status: ContainerStatus) -> None:
        with self._lock:
            self._status[name] = status
        self._notify()

    def container_status(self, name: str) -> ContainerStatus | None:
        with self._lock:
            return self._status.get(name)

    def container_statuses(self) -> dict[str, ContainerStatus]:
        with self._lock:
            return dict(self._status)

    def running_containers(self) -> set[str]:
        with self._lock:
            return {name for name, running in self._running.items() if running}

    def report_switch(self, host: str, generation: int, connected: bool, waiting: Collection[str] = ()) -> None:
        with self._lock:
            old = self._hosts.get(host, HostStatus())
            self._hosts[host] = dataclasses.replace(
                old, switch_generation=generation, switch_connected=connected, switch_waiting=frozenset(waiting)
            )
        self._notify()

    def report_agent(self, host: str, generation: int) -> None:
        with self._lock:
            old = self._hosts.get(host, HostStatus())
            self._hosts[host] = dataclasses.replace(old, agent_generation=generation)
        self._notify()

    def report_tunnels(self, host: str, tunnels: MappingABC[str, str]) -> None:
        """As an agent: its tunnels, peer -> ``"up"`` or ``"down: reason"`` (the store's signature)."""
        with self._lock:
            old = self._hosts.get(host, HostStatus())
            self._hosts[host] = dataclasses.replace(old, tunnels=tuple(sorted(tunnels.items())))
        self._notify()

    def report_uplink(self, host: str, uplink: str | None) -> None:
        """As an agent: the uplink it made a br0 port (no generation bump, as the store)."""
        with self._lock:
            hosts = dict(self._state.hosts)
            hosts[host] = dataclasses.replace(hosts[host], uplink=uplink)
            self._state = dataclasses.replace(self._state, hosts=hosts)
        self._notify()

    def host_status(self, host: str) -> HostStatus:
        with self._lock:
            return self._hosts.get(host, HostStatus())

    def host_drops(self, host: str) -> dict[str, int]:
        with self._lock:
            return dict(self.drops.get(host, {}))

    def _report_containers(self) -> None:
        """As agents would: each container running (or exited, if stopped) unless a test set its status."""
        for name in self._state.containers:
            status = self._status.get(name)
            if status is None or (status.state in (RunState.RUNNING, RunState.EXITED) and status.message in ("", "stopped")):
                if self._running.get(name, False):
                    self._status[name] = ContainerStatus(RunState.RUNNING)
                else:
                    self._status[name] = ContainerStatus(RunState.EXITED, message="stopped")

    def converge(self) -> None:
        """Every host reports the current generation (switch connected); containers run as desired."""
        with self._lock:
            gen = self._state.generation
            names = list(self._state.hosts)
            self._report_containers()
        for name in names:
            self.report_switch(name, gen, True)
            self.report_agent(name, gen)
