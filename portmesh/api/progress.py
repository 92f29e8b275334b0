"""How far the hosts have realised a generation, per host: what a write waits for, and who lags.

A write is live once the hosts it *concerns* have realised it: the hosts of the containers it
changed, and the gateway hosts (inbound traffic arrives there and is rewritten there). Every other
host is waited for too while it is up, but a host that is down -- its switch not connected to the
controller, or its agent silent (behind and not moving for :data:`AGENT_SILENCE` seconds, as this
API has seen it) -- is not: it is named in the answer's ``lagging`` instead, so one dead machine
never stalls the cloud. A write that concerns a host that is down waits for it, and times out (504)
naming it. See docs/components.md, "Waiting".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

from portmesh.api.schemas import ContainerProblem, HostProgress, LagOut, StatusOut
from portmesh.model.config import NetworkConfig
from portmesh.model.entities import (
    Container,
    ContainerStatus,
    DesiredState,
    Host,
    HostRole,
    HostStatus,
    Mapping,
    MappingCounters,
    MappingKey,
    RunState,
)

# An agent behind the store and not moving for this long counts as down (it reports every
# generation it realises, within milliseconds when alive; a full pass takes a few seconds).
AGENT_SILENCE = 10.0
# An agent whose heartbeat (schema 1.9.0, agent/heartbeat.py: a counter bumped every second by
# default) has not moved for this long is dead. On an eBPF host that makes the host down (the agent
# is what programs its datapath); on an OVS host it is only reported (the controller programs the
# switch, which still forwards): see :meth:`Liveness.agent_dead`.
AGENT_LEASE = 3.0
EBPF = "ebpf"


class StoreAPI(Protocol):
    """The part of :class:`portmesh.store.client.Store` the API uses (tests pass a fake)."""

    def snapshot(self) -> DesiredState: ...
    def subscribe(self, callback: Callable[[], None]) -> None: ...
    def add_host(self, host: Host, may_exist: bool = False) -> int: ...
    def remove_host(self, name: str, if_exists: bool = False) -> int: ...
    def set_config(self, config: NetworkConfig) -> int: ...
    def add_container(self, c: Container, mappings: Sequence[Mapping] = ()) -> int: ...
    def remove_container(self, name: str, if_exists: bool = False) -> int: ...
    def add_mapping(self, m: Mapping) -> int: ...
    def remove_mapping(self, key: MappingKey, if_exists: bool = False) -> int: ...
    def update_mapping(self, key: MappingKey, change: Callable[[Mapping], Mapping]) -> int: ...
    def mapping_health(self, key: MappingKey) -> dict[str, str]: ...
    def mapping_counters(self, key: MappingKey) -> MappingCounters: ...
    def set_container_running(self, name: str, running: bool, stop_timeout: int | None = None) -> int: ...
    def container_running(self, name: str) -> bool: ...
    def container_status(self, name: str) -> ContainerStatus | None: ...
    def container_statuses(self) -> dict[str, ContainerStatus]: ...
    def running_containers(self) -> set[str]: ...
    def host_status(self, host: str) -> HostStatus: ...
    def host_drops(self, host: str) -> dict[str, int]: ...


class Liveness:
    """Which hosts are down, as this API sees them: switch not connected, agent silent, or (an eBPF
    host) its agent's lease expired.

    The store holds no report times, so time is measured here, with this process's monotonic clock:
    the first time a host's agent is seen behind the store at some generation starts its silence
    clock, any progress resets it; the first time a host is seen, or its heartbeat seen to move
    (:meth:`beat`, fed by the store's row notices, and every :meth:`down`), starts its lease clock.
    A host never seen to beat since this API started (an older agent, one not started yet) is thus
    given a whole lease before it can count as dead. Thread-safe (statuses are computed in worker
    threads, beats arrive in the store's thread).
    """

    def __init__(
        self, silence: float = AGENT_SILENCE, clock: Callable[[], float] = time.monotonic, lease: float = AGENT_LEASE
    ) -> None:
        self.silence = silence
        self.lease = lease
        self.clock = clock
        self._lock = threading.Lock()
        self._behind: dict[str, tuple[int, float]] = {}  # host -> (agent generation, first seen behind at it)
        self._beats: dict[str, tuple[int, float]] = {}  # host -> (heartbeat, when first seen at that value)

    def beat(self, host: str, heartbeat: int) -> None:
        """The store says ``host``'s heartbeat is ``heartbeat`` now: a new value restarts its lease."""
        now = self.clock()
        with self._lock:
            self._see_beat(host, heartbeat, now)

    def _see_beat(self, host: str, heartbeat: int, now: float) -> float:
        """Record a sighting (lock held); the seconds since the heartbeat last moved (or was first seen)."""
        seen = self._beats.get(host)
        if seen is None or seen[0] != heartbeat:
            seen = self._beats[host] = (heartbeat, now)
        return now - seen[1]

    def agent_dead(self, host: str, hs: HostStatus) -> str | None:
        """Why ``host``'s agent counts as dead (its lease expired), or None; on either datapath.

        Only an agent that has said its datapath (schema 1.9.0) holds a lease: one from before it never
        beats and is judged by the silence rule alone, as it always was."""
        now = self.clock()
        with self._lock:
            quiet = self._see_beat(host, hs.heartbeat, now)
        if hs.datapath is None or quiet <= self.lease:
            return None
        return f"agent lease expired (no heartbeat for {quiet:.0f}s)"

    def forget(self, hosts: Collection[str]) -> None:
        """Drop what is known of hosts no longer in the store (a host added again starts afresh)."""
        with self._lock:
            for host in [h for h in self._beats if h not in hosts]:
                del self._beats[host]
            for host in [h for h in self._behind if h not in hosts]:
                del self._behind[host]

    def down(self, host: str, hs: HostStatus, current: int) -> str | None:
        """Why ``host`` counts as down against the store's ``current`` generation, or None.

        Down: its switch disconnected; or, on an eBPF host, its agent's lease expired (no switch to
        lose: the agent programs the datapath and reports it connected itself); or its agent silent
        (behind and not moving for :attr:`silence`). An OVS host whose agent's lease expired is not
        down for that (the controller programs its switch and it still forwards): :meth:`agent_dead`
        says so apart, and the silence rule still applies to its agent generation.
        """
        dead = self.agent_dead(host, hs)
        now = self.clock()
        with self._lock:
            if hs.agent_generation >= current:
                self._behind.pop(host, None)
                silent = 0.0
            else:
                seen = self._behind.get(host)
                if seen is None or seen[0] != hs.agent_generation:
                    seen = self._behind[host] = (hs.agent_generation, now)
                silent = now - seen[1]
        if not hs.switch_connected:
            return "switch disconnected"
        if dead is not None and hs.datapath == EBPF:
            return dead
        if silent > self.silence:
            return f"agent silent for {silent:.0f}s at generation {hs.agent_generation}"
        return None


def concerned_hosts(state: DesiredState, anchors: Collection[str]) -> set[str]:
    """The hosts a write concerns: ``anchors`` (the hosts of the containers it changed), the way out of
    each (:meth:`DesiredState.gateway_for`) and every gateway host (inbound arrives there)."""
    out = {h for h in anchors if h in state.hosts}
    out |= {gw for h in out if (gw := state.gateway_for(h)) is not None}
    out |= {h.name for h in state.hosts.values() if h.role is HostRole.GATEWAY}
    return out


class WaitTimeout(Exception):
    """A write is in the store but not yet live where it must be; carries the last progress seen."""

    def __init__(self, generation: int, status: StatusOut, timeout: float, containers: Sequence[str] = ()) -> None:
        lagging = {lag.host for lag in status.lagging}
        behind = [
            f"{h.name} ({h.down})" if h.down else h.name
            for h in status.hosts
            if h.name not in lagging and min(h.switch_generation, h.agent_generation) < generation
        ]
        where = [f"hosts {', '.join(behind)}"] if behind else []
        if containers:  # a per-object wait: say which of its objects are not live yet
            where.append(f"containers {', '.join(containers)} not reported live")
        super().__init__(f"generation {generation} not realised within {timeout:g}s: {'; '.join(where) or 'hosts'}")
        self.generation = generation
        self.status = status


# States in which a container has no port on its switch, and never will until something changes:
# it cannot start (error) or its process is gone (exited). Waiting for its flows would never end.
PORTLESS = (RunState.ERROR, RunState.EXITED)


def hosts_behind(status: StatusOut, generation: int) -> bool:
    """True if some host waited for has not reached ``generation`` (then that is the news, not the objects)."""
    lagging = {lag.host for lag in status.lagging}
    return any(min(h.switch_generation, h.agent_generation) < generation for h in status.hosts if h.name not in lagging)


def expects_port(running: bool, status: ContainerStatus | None) -> bool:
    """Whether a container should have a port (and flows) on its switch: desired to run and not
    reported unable to (an image container's port exists only while its process runs)."""
    return running and (status is None or status.state not in PORTLESS)


def compute_status(
    store: StoreAPI,
    target: int | None = None,
    containers: Sequence[str] | None = None,
    anchors: Collection[str] = (),
    liveness: Liveness | None = None,
    exempt: Collection[str] = (),
) -> StatusOut:
    """Progress of every host against ``target`` (default: the store's current generation). Blocking.

    A host is up to date when its switch and its agent have realised ``target`` and every
    container its switch still waits for (no port yet) is one that cannot have a port
    (:data:`PORTLESS` or stopped): what can be realised is realised. Containers in error, or
    exited although desired to run, are listed in ``problems``, not held against the host.

    With ``containers`` (the objects one write changed; empty for a write that changed none,
    e.g. a mapping removal) the answer's ``converged`` is per object instead: every switch and
    agent waited for at ``target``, and each named container reported on by its agent at
    ``target`` and, if it should run, holding its flows (not in its switch's waiting set).
    A container still starting elsewhere delays nobody. Hosts down and not concerned
    (:func:`concerned_hosts` of the containers' hosts and ``anchors``) are not waited for and
    listed in ``lagging``; the whole picture lists every host down and behind there. ``exempt`` hosts are
    never concerned (a host just added: its agent may not run yet, so it is waited for only if it is up).
    ``problems`` and the hosts' ``waiting`` are filled only for the whole picture.
    """
    state = store.snapshot()
    goal = state.generation if target is None else target
    if containers is None:  # the whole picture (GET /v1/status): every status, in one lock each
        statuses, running = store.container_statuses(), store.running_containers()
        concerned = set(state.hosts)
    else:
        # A write's answer: only the named containers, so that a write costs O(its objects), not
        # O(all containers) nor O(containers still starting) (bench/containers posts 1,000 in a row).
        names = set(containers)
        found = ((n, store.container_status(n)) for n in names)
        statuses = {n: st for n, st in found if st is not None}
        running = {n for n in names if store.container_running(n)}
        homes = {c.host for n in names if (c := state.containers.get(n)) is not None}
        concerned = concerned_hosts(state, homes | set(anchors)) - set(exempt)
    live = liveness or Liveness()
    if containers is None:
        live.forget(state.hosts)
    hosts, lagging = [], []
    caught_up = True
    for name in sorted(state.hosts):
        hs = store.host_status(name)
        at_goal = hs.switch_generation >= goal and hs.agent_generation >= goal
        down = live.down(name, hs, state.generation)
        if not at_goal and down is not None:
            lagging.append(LagOut(host=name, reason=down))
        if not at_goal and (name in concerned or down is None):
            caught_up = False
        starting = sorted(  # the whole picture only: a write's answer does not look at other containers
            c
            for c in (hs.switch_waiting if containers is None else ())
            if c in state.containers and expects_port(c in running, statuses.get(c))
        )
        hosts.append(
            HostProgress(
                name=name,
                switch_generation=hs.switch_generation,
                agent_generation=hs.agent_generation,
                switch_connected=hs.switch_connected,
                converged=at_goal and not starting,
                waiting=starting,
                down=down,
                agent_dead=live.agent_dead(name, hs),
            )
        )
    if containers is not None:  # a concerned host down is waited for: it is not "lagging" but the news
        lagging = [lag for lag in lagging if lag.host not in concerned]
    problems = [
        ContainerProblem(name=c.name, host=c.host, state=st.state.value, message=st.message)
        for c in (sorted(state.containers.values(), key=lambda c: c.name) if containers is None else ())
        if (st := statuses.get(c.name)) is not None
        and (st.state == RunState.ERROR or (st.state == RunState.EXITED and c.name in running))
    ]
    if containers is not None:
        converged = caught_up and all(_object_ready(store, state, name, statuses, running) for name in containers)
    else:
        converged = all(h.converged for h in hosts)
    return StatusOut(generation=state.generation, converged=converged, hosts=hosts, problems=problems, lagging=lagging)


def _object_ready(
    store: StoreAPI, state: DesiredState, name: str, statuses: dict[str, ContainerStatus], running: set[str]
) -> bool:
    """One container's part of a per-object wait (its host's agent has realised the target already)."""
    c = state.containers.get(name)
    if c is None:
        return True  # removed since: nothing of it left to wait for
    status = statuses.get(name)
    if status is None or status.state == RunState.PENDING:
        return False
    if not expects_port(name in running, status):
        return True  # its agent reported it stopped, exited or in error: that is the answer
    return name not in store.host_status(c.host).switch_waiting
