"""What the API does, apart from HTTP: validate against a snapshot, write, wait for convergence.

Writes other than a container's creation are serialised by one asyncio lock: each
takes a fresh snapshot, validates the request against it with the model's pure checks,
and only then writes, so two concurrent requests can never both pass validation for
the same port or name. The store's index constraints remain the last line of defence
against writers outside this process (they surface as :class:`Conflict`, i.e. 409).
A creation takes no lock: its port block is kept unique by the store's ``Block``
index, whatever the number of API instances, and a lost race is retried with the
next block (:meth:`Service.add_container`).

The store client is synchronous (its IDL runs in its own thread); every call goes
through :func:`asyncio.to_thread` so the event loop never blocks on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import TypeVar

from portmesh.api.balancing import Change, plan_backend_add, plan_backend_remove, plan_mapping, plan_patch
from portmesh.api.config_schemas import ConfigPatch
from portmesh.api.progress import (
    AGENT_LEASE,
    AGENT_SILENCE,
    Liveness,
    StoreAPI,
    WaitTimeout,
    compute_status,
    hosts_behind,
)
from portmesh.api.schemas import (
    BackendIn,
    ContainerIn,
    ContainerOut,
    HostIn,
    HostOut,
    MappingIn,
    MappingOut,
    MappingPatch,
    StatusOut,
)
from portmesh.api.settings import plan_config, plan_pool_add, plan_pool_remove
from portmesh.model.blocks import CLAIM_ATTEMPTS, CLAIM_SPREAD, BlockTaken, allocate_block
from portmesh.model.config import NetworkConfig
from portmesh.model.entities import (
    Container,
    ContainerStatus,
    DesiredState,
    Host,
    HostRole,
    Mapping,
    MappingKey,
    PortBlock,
    RunState,
)
from portmesh.model.errors import Conflict, InvalidInput, ModelError, NotFound
from portmesh.model.names import generate_name
from portmesh.model.validation import (
    choose_host,
    new_container,
    new_mapping,
    parse_env,
    parse_image,
    parse_ip,
    parse_name,
    parse_port,
    parse_proto,
    parse_restart,
    parse_stop_timeout,
)

T = TypeVar("T")
__all__ = ["Service", "StoreAPI", "WaitTimeout"]  # the last two re-exported from progress.py (their old home)

# Backstop only: convergence is noticed through the store's change callback; this
# re-check bounds the delay should a callback be missed (e.g. during a reconnect).
RECHECK_SECONDS = 1.0


def container_view(store: StoreAPI, state: DesiredState, c: Container) -> ContainerOut:
    """A container with its desired run state, reported status and mappings. Blocking."""
    return ContainerOut.of(
        c,
        running=store.container_running(c.name),
        status=store.container_status(c.name),
        mappings=state.mappings_of(c.name),
    )


def plan_container(
    state: DesiredState,
    config: NetworkConfig,
    body: ContainerIn,
    refused: frozenset[PortBlock] = frozenset(),
    nth: int = 0,
) -> tuple[Container, list[Mapping]]:
    """The container and its ``ips x ports`` mappings, checked against ``state`` as one unit.

    ``refused``: blocks the store just refused (claimed by another writer), never chosen;
    ``nth``: take the nth free block rather than the lowest (a retry's spread, :func:`allocate_block`).

    A missing name is generated (Docker's ``adjective_surname``, never the command's first word);
    a missing host is chosen by :func:`choose_host` (fewest containers, ties by name).
    """
    ips = [parse_ip(ip, f"ips[{i}]") for i, ip in enumerate(body.ips)]
    parsed = [
        (parse_port(p.port, f"ports[{i}].port"), parse_proto(p.proto, f"ports[{i}].proto")) for i, p in enumerate(body.ports)
    ]
    # A port listed twice ("80", "80/TCP") is the same mapping asked for twice: one mapping, as a set.
    # (Refusing it could not be stated in the OpenAPI document: uniqueItems compares the raw JSON.)
    ports = list(dict.fromkeys(parsed))
    if body.image is not None:
        parse_image(body.image, "image")
    name = body.name if body.name is not None else generate_name(state.containers)
    host = body.host if body.host is not None else choose_host(state)
    container = new_container(
        state,
        config,
        name=name,
        host=host,
        ips=ips,
        command=tuple(body.command),
        image=body.image,
        env=parse_env(body.env),
        restart=parse_restart(body.restart),
        stop_timeout=parse_stop_timeout(body.stop_timeout),
    )
    # Never a block holding one of the container's own ports (new_mapping refuses that): choose past it.
    size = config.block_size
    refused = refused | {PortBlock(port - port % size, size) for port, _ in ports}
    if container.block in refused or nth:
        container = dataclasses.replace(container, block=allocate_block(state, config, ips, refused, nth))
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
    """A new host, unique by name, datapath id and underlay address (which no public pool may hold).

    Without a role it is the gateway if the cloud has no gateway host yet (the first host faces the
    outside, as a one-machine cloud does), else a compute host.
    """
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
        # Well-formed but unusable here: 409, as an IP outside the pools is for a container (check_public_ip).
        if underlay.is_unspecified or underlay.is_multicast or underlay.is_loopback or underlay == IPv4Address("255.255.255.255"):
            raise Conflict("underlay_ip", f"{underlay} is not a unicast address another host can reach")
        if state.config.in_pools(underlay):
            raise Conflict("underlay_ip", f"{underlay} is in a public pool: public IPs are for containers")
        owner = next((h.name for h in state.hosts.values() if h.underlay_ip == underlay), None)
        if owner is not None:
            raise Conflict("underlay_ip", f"{underlay} is already host {owner!r}'s underlay address")
    if body.role is None:
        has_gateway = any(h.role is HostRole.GATEWAY for h in state.hosts.values())
        role = HostRole.COMPUTE if has_gateway else HostRole.GATEWAY
    else:
        try:
            role = HostRole(body.role)
        except ValueError:
            raise InvalidInput("role", f"{body.role!r} is not one of {', '.join(r.value for r in HostRole)}") from None
    return Host(name=name, datapath_id=dpid, underlay_ip=underlay, role=role)


def parse_key(public_ip: str, proto: str, port: int | str) -> MappingKey:
    """A mapping key from request strings, naming the field at fault."""
    return MappingKey(parse_ip(public_ip, "public_ip"), parse_proto(proto, "proto"), parse_port(port, "port"))


def start_failure(c: Container, status: ContainerStatus) -> ModelError:
    """The refusal for a create whose first start failed: the field at fault and the agent's reason.

    Only the host's engine knows whether an image exists or a command can be executed, so the
    field is read from the reason: an image container whose reason names the image is refused
    for ``image`` (404: the named image does not exist), anything else for ``command`` (422).
    """
    reason = f"container {c.name!r} could not start, so it was not created: {status.message or status.state.value}"
    if c.image and "image" in status.message.lower():
        return NotFound("image", reason)
    return InvalidInput("command", reason)


def existing_container(state: DesiredState, name: str) -> Container:
    """The container called ``name`` or a 404 naming it."""
    c = state.containers.get(name)
    if c is None:
        raise NotFound("name", f"container {name!r} does not exist")
    return c


class Service:
    """The API's state: the store, the write lock, and the convergence signal."""

    def __init__(
        self,
        store: StoreAPI,
        config: NetworkConfig | None = None,
        wait_timeout: float = 30.0,
        agent_silence: float = AGENT_SILENCE,
        agent_lease: float = AGENT_LEASE,
    ) -> None:
        """``config`` is accepted for callers of the one-host API and ignored: every check reads the
        store's (``state.config``, the Global row), so API instances never disagree on it."""
        del config
        self.store = store
        self.wait_timeout = wait_timeout
        self.liveness = Liveness(agent_silence, lease=agent_lease)
        self.write_lock = asyncio.Lock()
        self._claiming: set[tuple[PortBlock, str]] = set()  # (block, IP) of this loop's creates in flight
        self._mapping: set[tuple[str, int]] = set()  # (IP, port) of this loop's add_mapping in flight
        self._changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start hearing about store changes on ``loop`` (called once the loop runs)."""
        self._loop = loop
        self._changed = asyncio.Event()
        self.store.subscribe(self._on_change)
        # The agents' beats, timed as they arrive (a store without the verb, a test's fake, leaves the
        # lease to the sightings every status makes).
        watch = getattr(self.store, "watch_heartbeats", None)
        if watch is not None:
            watch(self.liveness.beat)

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

    async def status(
        self,
        target: int | None = None,
        containers: Sequence[str] | None = None,
        hosts: Sequence[str] = (),
        exempt: Sequence[str] = (),
    ) -> StatusOut:
        return await self.call(compute_status, self.store, target, containers, hosts, self.liveness, exempt)

    async def wait_converged(
        self,
        generation: int,
        timeout: float | None = None,
        containers: Sequence[str] = (),
        hosts: Sequence[str] = (),
        exempt: Sequence[str] = (),
    ) -> StatusOut:
        """Return once ``generation`` is realised for the write that made it, per object (the
        ``containers`` it changed) and per host (those it concerns: the containers' and ``hosts``,
        the gateways; see :func:`compute_status`); :class:`WaitTimeout` after ``timeout`` s."""
        limit = self.wait_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            if self._changed is not None:
                self._changed.clear()  # cleared before reading, so a change after the read wakes us
            status = await self.status(generation, containers, hosts, exempt)
            if status.converged:
                return status
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise WaitTimeout(generation, status, limit, [] if hosts_behind(status, generation) else containers)
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

    async def remove_host(self, name: str) -> int:
        """Forget a host: 404 unknown, 409 while containers are placed on it (named; move or remove them)."""
        async with self.write_lock:
            state = await self.snapshot()
            if name not in state.hosts:
                raise NotFound("name", f"host {name!r} does not exist")
            placed = [c.name for c in state.containers_on(name)]
            if placed:
                more = f" and {len(placed) - 3} more" if len(placed) > 3 else ""
                raise Conflict("name", f"host {name!r} still holds container {', '.join(map(repr, placed[:3]))}{more}")
            return await self.call(self.store.remove_host, name)

    # --- configuration (the store's Global row) ---

    async def set_config(self, patch: ConfigPatch) -> tuple[int, NetworkConfig]:
        """Apply ``patch``; an unchanged config writes nothing (the current generation is the answer)."""
        async with self.write_lock:
            state = await self.snapshot()
            config = plan_config(state, patch)
            if config == state.config:
                return state.generation, config
            if self._claiming:  # a create takes no lock: one in flight would be plumbed with the old values
                raise Conflict("body", "a container is being created; try again once it is")
            return await self.call(self.store.set_config, config), config

    async def add_pool(self, value: str) -> tuple[int, IPv4Network]:
        async with self.write_lock:
            config, pool = plan_pool_add(await self.snapshot(), value)
            return await self.call(self.store.set_config, config), pool

    async def remove_pool(self, address: str, prefix: int) -> tuple[int, IPv4Network]:
        async with self.write_lock:
            config, pool = plan_pool_remove(await self.snapshot(), address, prefix)
            creating = sorted({ip for _, ip in self._claiming if parse_ip(ip) in pool})
            if creating:  # a create takes no lock: one in flight may be about to hold an IP of this pool
                raise Conflict("pool", f"{pool} is in use: a container is being created on {', '.join(creating)}")
            return await self.call(self.store.set_config, config), pool

    async def add_container(self, body: ContainerIn) -> tuple[int, Container, list[Mapping]]:
        """Plan and write a container; if its port block was claimed meanwhile, plan again without it.

        No lock: the store's ``Block`` index keeps a block to one container per IP across every
        API instance, and refuses a lost race with :class:`BlockTaken`. After
        :data:`CLAIM_ATTEMPTS` lost races the answer is a 409 naming ``ips``.
        """
        refused: set[PortBlock] = set()
        for attempt in range(CLAIM_ATTEMPTS):
            state = await self.snapshot()
            # Blocks this instance is committing right now are skipped, so its own concurrent
            # creates do not race each other (a mere set: the index is what guarantees uniqueness).
            busy = {block for block, ip in self._claiming if ip in body.ips}
            size = state.config.block_size  # and the blocks of ports this instance is mapping right now
            busy |= {PortBlock(port - port % size, size) for ip, port in self._mapping if ip in body.ips}
            # A retry spreads out at random: writers that all took the next lowest block collided again.
            nth = random.randrange(CLAIM_SPREAD * attempt) if attempt else 0
            container, mappings = plan_container(state, state.config, body, frozenset(refused | busy), nth)
            mine = {(container.block, str(ip)) for ip in container.ips}
            self._claiming |= mine
            try:
                generation = await self.call(self.store.add_container, container, mappings)
            except BlockTaken:
                refused.add(container.block)
                continue
            except Conflict as exc:
                if body.name is not None or exc.field not in ("name", "mac"):
                    raise
                continue  # a generated name another create took meanwhile (no lock now): generate another
            finally:
                self._claiming -= mine
            return generation, container, mappings
        raise Conflict(
            "ips",
            f"port blocks claimed concurrently by other writers {CLAIM_ATTEMPTS} times in a row; try again",
        )

    async def create_container(
        self, body: ContainerIn, wait: bool, timeout: float | None = None
    ) -> tuple[int, Container, StatusOut]:
        """Create a container; with ``wait``, a first start that fails undoes the create.

        The wait is per object (this container and the switches), so a broken container
        elsewhere on the host never delays it. If the agent reports the container in error
        at its first attempt (image not found, command not executable), the container is
        removed again -- row, port block and mappings in one transaction -- and the refusal
        names ``image`` or ``command`` (:func:`start_failure`): a create that fails changes
        nothing. A container that starts and exits at once is created (as Docker keeps it);
        its status says so. Without ``wait`` the container stays, in error with its reason.
        """
        generation, container, _ = await self.add_container(body)
        if not wait:
            return generation, container, await self.status(generation, [container.name])
        limit = self.wait_timeout if timeout is None else timeout
        deadline = asyncio.get_running_loop().time() + limit
        progress = await self.wait_converged(generation, limit, [container.name])
        status = await self.call(self.store.container_status, container.name)
        if status is None or status.state != RunState.ERROR:
            return generation, container, progress
        async with self.write_lock:
            # Only the container this request made (a concurrent rm + run of the same name is left alone).
            if (await self.snapshot()).containers.get(container.name) == container:
                undone = await self.call(self.store.remove_container, container.name, True)
            else:
                undone = None
        if undone is not None:
            # Answer once its host has let go of it too (namespace, port); the refusal stands regardless.
            remaining = max(0.1, deadline - asyncio.get_running_loop().time())
            with contextlib.suppress(WaitTimeout):
                await self.wait_converged(undone, remaining, hosts=[container.host])
        raise start_failure(container, status)

    async def remove_container(self, name: str) -> tuple[int, str]:
        """The generation and the host it was on (the host the removal concerns)."""
        async with self.write_lock:
            c = existing_container(await self.snapshot(), name)
            return await self.call(self.store.remove_container, name), c.host

    async def set_running(self, name: str, running: bool, stop_timeout: int | None = None) -> int:
        """``stop_timeout`` (a stop's ``?time=``) is written with the run state, in the same transaction."""
        async with self.write_lock:
            existing_container(await self.snapshot(), name)
            if stop_timeout is None:
                return await self.call(self.store.set_container_running, name, running)
            return await self.call(self.store.set_container_running, name, running, parse_stop_timeout(stop_timeout, "time"))

    async def add_mapping(self, body: MappingIn) -> tuple[int, Mapping, bool]:
        """Add a mapping (one container, or several backends with weights, a policy, a health check);
        True as the third value if it was created, False if the very same mapping existed already
        (idempotent, as ovsdbapp's ``may_exist``: nothing written). The same key mapped otherwise
        stays a :class:`Conflict`."""
        async with self.write_lock:
            key = parse_key(body.public_ip, body.proto, body.port)
            state = await self.snapshot()
            mapping, existing = plan_mapping(state, key, body)
            if existing is not None:
                return state.generation, existing, False
            self._check_claims(key)
            entry = (str(key.public_ip), key.port)
            self._mapping.add(entry)
            try:
                return await self.call(self.store.add_mapping, mapping), mapping, True
            finally:
                self._mapping.discard(entry)

    def _check_claims(self, key: MappingKey) -> None:
        """A create takes no lock: one in flight may be claiming the block ``key``'s port lies in."""
        for block, ip in self._claiming:
            if ip == str(key.public_ip) and key.port in block:
                raise Conflict("port", f"{key.port} lies in ephemeral block {block} being given to a new container")

    async def _existing_mapping(self, public_ip: str, proto: str, port: int | str) -> tuple[DesiredState, Mapping]:
        key = parse_key(public_ip, proto, port)
        state = await self.snapshot()
        mapping = state.mappings.get(key)
        if mapping is None:
            raise NotFound("mapping", f"{key} is not mapped")
        return state, mapping

    async def _update(self, state: DesiredState, mapping: Mapping, change: Change) -> tuple[int, Mapping]:
        """Write ``change`` in one store transaction; an update that changes nothing writes nothing."""
        after = change(mapping)
        if after == mapping:
            return state.generation, mapping
        return await self.call(self.store.update_mapping, mapping.key, change), after

    async def patch_mapping(self, public_ip: str, proto: str, port: int | str, patch: MappingPatch) -> tuple[int, Mapping]:
        """Change a mapping's policy, health check or weights (404 unknown mapping; the checks of plan_patch)."""
        async with self.write_lock:
            state, mapping = await self._existing_mapping(public_ip, proto, port)
            return await self._update(state, mapping, plan_patch(mapping, patch))

    async def add_backend(self, public_ip: str, proto: str, port: int | str, body: BackendIn) -> tuple[int, Mapping]:
        """One more backend (404 unknown mapping or container; 409 already one, IP not held, port in a block)."""
        async with self.write_lock:
            state, mapping = await self._existing_mapping(public_ip, proto, port)
            change = plan_backend_add(state, mapping, body.container, body.weight)
            self._check_claims(mapping.key)
            return await self._update(state, mapping, change)

    async def remove_backend(self, public_ip: str, proto: str, port: int | str, name: str) -> tuple[int, Mapping, str | None]:
        """One backend less (404 not a backend; 409 the last one); also the host it was on."""
        async with self.write_lock:
            state, mapping = await self._existing_mapping(public_ip, proto, port)
            change = plan_backend_remove(mapping, name)
            owner = state.containers.get(name)
            generation, after = await self._update(state, mapping, change)
            return generation, after, owner.host if owner else None

    async def remove_mapping(self, public_ip: str, proto: str, port: int | str) -> tuple[int, list[str]]:
        """The generation and the hosts of the containers it pointed at (the hosts the removal concerns)."""
        async with self.write_lock:
            state, mapping = await self._existing_mapping(public_ip, proto, port)
            hosts = sorted({c.host for name in mapping.names if (c := state.containers.get(name)) is not None})
            return await self.call(self.store.remove_mapping, mapping.key), hosts

    # --- reads ---

    async def hosts(self) -> list[HostOut]:
        def read() -> list[HostOut]:
            state = self.store.snapshot()
            count = {name: 0 for name in state.hosts}
            for c in state.containers.values():
                count[c.host] = count.get(c.host, 0) + 1
            self.liveness.forget(state.hosts)
            return [self._host_out(state, h, count[h.name]) for _, h in sorted(state.hosts.items())]

        return await self.call(read)

    async def host(self, name: str) -> HostOut:
        def read() -> HostOut:
            state = self.store.snapshot()
            host = state.hosts.get(name)
            if host is None:
                raise NotFound("name", f"host {name!r} does not exist")
            return self._host_out(state, host, len(state.containers_on(name)))

        return await self.call(read)

    def _host_out(self, state: DesiredState, host: Host, containers: int) -> HostOut:
        """A host as listed: its status with whether it counts as down and its agent as dead. Blocking."""
        hs = self.store.host_status(host.name)
        down = self.liveness.down(host.name, hs, state.generation)
        dead = self.liveness.agent_dead(host.name, hs)
        return HostOut.of(host, hs, containers, self.store.host_drops(host.name), down, dead)

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

    async def mappings(self) -> list[MappingOut]:
        """Every mapping; backends' health read only for mappings with a check (others are unchecked),
        counters only per mapping (:meth:`mapping`), so a list of 100,000 costs no per-row store reads."""

        def read() -> list[MappingOut]:
            state = self.store.snapshot()
            out = []
            for key in sorted(state.mappings):
                m = state.mappings[key]
                out.append(MappingOut.of(m, self.store.mapping_health(key) if m.health is not None or m.down else None))
            return out

        return await self.call(read)

    async def view(self, mapping: Mapping) -> MappingOut:
        """A write's answer: the mapping with its backends' reported health (no counters: read it for them)."""
        if mapping.health is None and not mapping.down:
            return MappingOut.of(mapping)
        return MappingOut.of(mapping, await self.call(self.store.mapping_health, mapping.key))

    async def mapping(self, public_ip: str, proto: str, port: int | str) -> MappingOut:
        """One mapping with its backends' health and its counters (404 if the key is not mapped)."""
        key = parse_key(public_ip, proto, port)

        def read() -> MappingOut:
            mapping = self.store.snapshot().mappings.get(key)
            if mapping is None:
                raise NotFound("mapping", f"{key} is not mapped")
            return MappingOut.of(mapping, self.store.mapping_health(key), self.store.mapping_counters(key))

        return await self.call(read)
