"""What the API does, apart from HTTP: validate against a snapshot, write, wait for convergence.

Writes are serialised by one asyncio lock: each takes a fresh snapshot, validates
the request against it with the model's pure checks, and only then writes, so two
concurrent requests can never both pass validation for the same port or name.
The store's index constraints remain the last line of defence against writers
outside this process (they surface as :class:`Conflict`, i.e. 409).

The store client is synchronous (its IDL runs in its own thread); every call goes
through :func:`asyncio.to_thread` so the event loop never blocks on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address
from typing import Protocol, TypeVar

from portmesh.api.logs import read_log
from portmesh.api.schemas import (
    ContainerIn,
    ContainerOut,
    HostIn,
    HostOut,
    HostProgress,
    LogsOut,
    MappingIn,
    StatusOut,
)
from portmesh.model.config import NetworkConfig
from portmesh.model.entities import (
    Container,
    ContainerStatus,
    DesiredState,
    Host,
    HostStatus,
    Mapping,
    MappingKey,
)
from portmesh.model.errors import Conflict, InvalidInput, NotFound
from portmesh.model.validation import (
    new_container,
    new_mapping,
    parse_ip,
    parse_name,
    parse_port,
    parse_proto,
)

T = TypeVar("T")

# Backstop only: convergence is noticed through the store's change callback; this
# re-check bounds the delay should a callback be missed (e.g. during a reconnect).
RECHECK_SECONDS = 1.0


class StoreAPI(Protocol):
    """The part of :class:`portmesh.store.client.Store` the API uses (tests pass a fake)."""

    def snapshot(self) -> DesiredState: ...
    def subscribe(self, callback: Callable[[], None]) -> None: ...
    def add_host(self, host: Host, may_exist: bool = False) -> int: ...
    def add_container(self, c: Container, mappings: Sequence[Mapping] = ()) -> int: ...
    def remove_container(self, name: str, if_exists: bool = False) -> int: ...
    def add_mapping(self, m: Mapping) -> int: ...
    def remove_mapping(self, key: MappingKey, if_exists: bool = False) -> int: ...
    def set_container_running(self, name: str, running: bool) -> int: ...
    def container_running(self, name: str) -> bool: ...
    def container_status(self, name: str) -> ContainerStatus | None: ...
    def host_status(self, host: str) -> HostStatus: ...


class WaitTimeout(Exception):
    """A write is in the store but not yet live everywhere; carries the last progress seen."""

    def __init__(self, generation: int, status: StatusOut, timeout: float) -> None:
        lagging = [h.name for h in status.hosts if not h.converged]
        super().__init__(f"generation {generation} not realised within {timeout:g}s on: {', '.join(lagging)}")
        self.generation = generation
        self.status = status


def compute_status(store: StoreAPI, target: int | None = None) -> StatusOut:
    """Progress of every host against ``target`` (default: the store's current generation). Blocking."""
    state = store.snapshot()
    goal = state.generation if target is None else target
    hosts = []
    for name in sorted(state.hosts):
        hs = store.host_status(name)
        done = hs.switch_generation >= goal and hs.agent_generation >= goal
        hosts.append(
            HostProgress(
                name=name,
                switch_generation=hs.switch_generation,
                agent_generation=hs.agent_generation,
                switch_connected=hs.switch_connected,
                converged=done,
            )
        )
    return StatusOut(generation=state.generation, converged=all(h.converged for h in hosts), hosts=hosts)


def container_view(store: StoreAPI, state: DesiredState, c: Container) -> ContainerOut:
    """A container with its desired run state, reported status and mappings. Blocking."""
    return ContainerOut.of(
        c,
        running=store.container_running(c.name),
        status=store.container_status(c.name),
        mappings=state.mappings_of(c.name),
    )


def plan_container(state: DesiredState, config: NetworkConfig, body: ContainerIn) -> tuple[Container, list[Mapping]]:
    """The container and its ``ips x ports`` mappings, checked against ``state`` as one unit."""
    ips = [parse_ip(ip, f"ips[{i}]") for i, ip in enumerate(body.ips)]
    parsed = [
        (parse_port(p.port, f"ports[{i}].port"), parse_proto(p.proto, f"ports[{i}].proto")) for i, p in enumerate(body.ports)
    ]
    # A port listed twice ("80", "80/TCP") is the same mapping asked for twice: one mapping, as a set.
    # (Refusing it could not be stated in the OpenAPI document: uniqueItems compares the raw JSON.)
    ports = list(dict.fromkeys(parsed))
    if body.image is not None and not body.image.strip():
        raise InvalidInput("image", "empty image name")
    container = new_container(
        state, config, name=body.name, host=body.host, ips=ips, command=tuple(body.command), image=body.image
    )
    # Check each mapping against a state that already holds the container and the
    # mappings before it, exactly as the store will hold them after the transaction.
    pending = dataclasses.replace(
        state, containers={**state.containers, container.name: container}, mappings=dict(state.mappings)
    )
    mappings = []
    for ip in ips:
        for port, proto in ports:
            m = new_mapping(pending, MappingKey(ip, proto, port), container.name)
            pending.mappings[m.key] = m
            mappings.append(m)
    return container, mappings


def plan_host(state: DesiredState, body: HostIn) -> Host:
    """A new host, unique by name and by datapath id."""
    name = parse_name(body.name, "name")
    if name in state.hosts:
        raise Conflict("name", f"host {name!r} already exists")
    used = {h.datapath_id for h in state.hosts.values()}
    dpid = body.datapath_id
    if dpid is None:
        dpid = next(i for i in range(1, len(used) + 2) if i not in used)
    elif dpid in used:
        raise Conflict("datapath_id", f"datapath id {dpid:#x} is already used by another host")
    underlay: IPv4Address | None = None
    if body.underlay_ip is not None:
        underlay = parse_ip(body.underlay_ip, "underlay_ip")
    return Host(name=name, datapath_id=dpid, underlay_ip=underlay)


def parse_key(public_ip: str, proto: str, port: int | str) -> MappingKey:
    """A mapping key from request strings, naming the field at fault."""
    return MappingKey(parse_ip(public_ip, "public_ip"), parse_proto(proto, "proto"), parse_port(port, "port"))


def existing_container(state: DesiredState, name: str) -> Container:
    """The container called ``name`` or a 404 naming it."""
    c = state.containers.get(name)
    if c is None:
        raise NotFound("name", f"container {name!r} does not exist")
    return c


class Service:
    """The API's state: the store, the write lock, and the convergence signal."""

    def __init__(self, store: StoreAPI, config: NetworkConfig, wait_timeout: float = 30.0) -> None:
        self.store = store
        self.config = config
        self.wait_timeout = wait_timeout
        self.write_lock = asyncio.Lock()
        self._changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start hearing about store changes on ``loop`` (called once the loop runs)."""
        self._loop = loop
        self._changed = asyncio.Event()
        self.store.subscribe(self._on_change)

    def detach(self) -> None:
        """Stop waking the loop (the store has no unsubscribe; the callback becomes a no-op)."""
        self._loop = None

    def _on_change(self) -> None:
        # Runs in the store's IDL thread: hand over to the loop, never touch asyncio here.
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closing under us
            loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run a blocking store call off the event loop."""
        return await asyncio.to_thread(fn, *args)

    async def snapshot(self) -> DesiredState:
        return await self.call(self.store.snapshot)

    async def status(self, target: int | None = None) -> StatusOut:
        return await self.call(compute_status, self.store, target)

    async def wait_converged(self, generation: int, timeout: float | None = None) -> StatusOut:
        """Return once every host realised ``generation``; :class:`WaitTimeout` after ``timeout`` s."""
        limit = self.wait_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            if self._changed is not None:
                self._changed.clear()  # cleared before reading, so a change after the read wakes us
            status = await self.status(generation)
            if status.converged:
                return status
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise WaitTimeout(generation, status, limit)
            pause = min(remaining, RECHECK_SECONDS)
            if self._changed is None:
                await asyncio.sleep(pause)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), pause)

    # --- writes: validate against a fresh snapshot under the lock, then one store call ---

    async def add_host(self, body: HostIn) -> tuple[int, Host]:
        async with self.write_lock:
            host = plan_host(await self.snapshot(), body)
            return await self.call(self.store.add_host, host), host

    async def add_container(self, body: ContainerIn) -> tuple[int, Container, list[Mapping]]:
        async with self.write_lock:
            container, mappings = plan_container(await self.snapshot(), self.config, body)
            generation = await self.call(self.store.add_container, container, mappings)
            return generation, container, mappings

    async def remove_container(self, name: str) -> int:
        async with self.write_lock:
            existing_container(await self.snapshot(), name)
            return await self.call(self.store.remove_container, name)

    async def set_running(self, name: str, running: bool) -> int:
        async with self.write_lock:
            existing_container(await self.snapshot(), name)
            return await self.call(self.store.set_container_running, name, running)

    async def add_mapping(self, body: MappingIn) -> tuple[int, Mapping]:
        async with self.write_lock:
            key = parse_key(body.public_ip, body.proto, body.port)
            mapping = new_mapping(await self.snapshot(), key, body.container)
            return await self.call(self.store.add_mapping, mapping), mapping

    async def remove_mapping(self, public_ip: str, proto: str, port: int | str) -> int:
        async with self.write_lock:
            key = parse_key(public_ip, proto, port)
            if key not in (await self.snapshot()).mappings:
                raise NotFound("mapping", f"{key} is not mapped")
            return await self.call(self.store.remove_mapping, key)

    # --- reads ---

    async def hosts(self) -> list[HostOut]:
        def read() -> list[HostOut]:
            state = self.store.snapshot()
            return [HostOut.of(h, self.store.host_status(h.name)) for _, h in sorted(state.hosts.items())]

        return await self.call(read)

    async def host(self, name: str) -> HostOut:
        def read() -> HostOut:
            host = self.store.snapshot().hosts.get(name)
            if host is None:
                raise NotFound("name", f"host {name!r} does not exist")
            return HostOut.of(host, self.store.host_status(name))

        return await self.call(read)

    async def containers(self) -> list[ContainerOut]:
        def read() -> list[ContainerOut]:
            state = self.store.snapshot()
            return [container_view(self.store, state, c) for _, c in sorted(state.containers.items())]

        return await self.call(read)

    async def container(self, name: str) -> ContainerOut:
        def read() -> ContainerOut:
            state = self.store.snapshot()
            return container_view(self.store, state, existing_container(state, name))

        return await self.call(read)

    async def logs(self, name: str, offset: int, tail: int | None) -> LogsOut:
        def read() -> LogsOut:
            existing_container(self.store.snapshot(), name)
            status = self.store.container_status(name)
            chunk = read_log(name, status.log_path if status is not None else "", offset, tail)
            return LogsOut(name=name, path=chunk.path, offset=chunk.offset, text=chunk.text)

        return await self.call(read)

    async def mappings(self) -> list[Mapping]:
        state = await self.snapshot()
        return [state.mappings[k] for k in sorted(state.mappings)]
