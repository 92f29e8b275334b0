"""The desired-state vocabulary: hosts, containers, port blocks and mappings.

These are plain, immutable values. Every other component (store, controller,
agent, api) speaks in these types, so they import nothing of ours and carry no
I/O. Validation lives in :mod:`portmesh.model.validation`; a value built through
:func:`Container.new` and friends is already valid.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from ipaddress import IPv4Address, IPv4Network

from portmesh.model.config import DEFAULT_CONFIG, NetworkConfig


class Proto(enum.StrEnum):
    """Transport protocols a mapping can name."""

    TCP = "tcp"
    UDP = "udp"


@dataclass(frozen=True, order=True)
class PortBlock:
    """An aligned block of ephemeral source ports owned by one container.

    ``size`` is a power of two and ``start`` a multiple of it, so the whole block
    is matched by one masked ``tp_dst`` flow: ``start/mask``.
    """

    start: int
    size: int

    @property
    def end(self) -> int:
        """Last port of the block (inclusive)."""
        return self.start + self.size - 1

    @property
    def mask(self) -> int:
        """The 16-bit mask that matches exactly this block."""
        return 0xFFFF & ~(self.size - 1)

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.start <= port <= self.end

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"


class HostRole(enum.StrEnum):
    """What a host does besides running containers.

    ``gateway``: it faces the outside (its kernel routes the public pools in and
    containers' traffic out), so its switch hands frames for the gateway MAC to
    the host itself. ``compute``: it never sends public-source traffic out of its
    own uplink; its switch sends frames for the gateway MAC through the tunnel to
    a gateway host. A cloud without a gateway host treats every host as its own
    gateway (one machine: ``portmesh up``).
    """

    GATEWAY = "gateway"
    COMPUTE = "compute"


@dataclass(frozen=True)
class Host:
    """A machine running one Open vSwitch bridge and one portmesh agent.

    ``underlay_ip`` is where other hosts' VXLAN tunnels end (a host without one
    gets no tunnels); ``datapath_id`` is the bridge's OpenFlow datapath id, which
    is how the controller recognises the switch when it connects. ``uplink`` is the
    interface a gateway host's agent made a port of its bridge (``--uplink``): the
    switch takes inbound traffic to the public pools straight from it, before the
    host's routing (reported by the agent, not set by the operator; None: the host
    routes it in through the bridge's internal port).
    """

    name: str
    datapath_id: int
    underlay_ip: IPv4Address | None = None
    role: HostRole = HostRole.GATEWAY
    uplink: str | None = None

    @cached_property
    def tunnel_port(self) -> str:
        """Name of the VXLAN device (and bridge port) that other hosts use to reach this one."""
        return tunnel_port_for(self.name)


class RestartPolicy(enum.StrEnum):
    """What the host does when a container's process exits, with Docker's names and default.

    ``no``: leave it exited (its status says so, with the exit code); ``on-failure``:
    start it again if it exited with a non-zero code; ``always``: start it again.
    """

    NO = "no"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


DEFAULT_STOP_TIMEOUT = 10  # seconds from SIGTERM to SIGKILL, as ``docker stop``


@dataclass(frozen=True)
class Container:
    """An endpoint that holds one or more public IPs on one host.

    The MAC is fixed for the container's life (it is what the mapping rewrites
    to), and survives restarts of the container and of every portmesh process.
    ``env`` holds ``KEY=VALUE`` strings for the command's environment; ``restart``
    says whether an exited process is started again; ``stop_timeout`` is how long
    a stop waits after SIGTERM before SIGKILL. ``starts`` counts the starts asked for
    while it was not running (``portmesh start`` of an exited container, as ``docker
    start``): a runtime that sees it change starts the process whatever the policy.
    """

    name: str
    host: str
    mac: str
    ips: tuple[IPv4Address, ...]
    block: PortBlock
    command: tuple[str, ...] = ()
    image: str | None = None
    env: tuple[str, ...] = ()
    restart: RestartPolicy = RestartPolicy.NO
    stop_timeout: int = DEFAULT_STOP_TIMEOUT
    starts: int = 0

    @cached_property
    def port_name(self) -> str:
        """Name of the container's veth end on the host's bridge (<=15 chars); a digest, so kept."""
        return port_name_for(self.name)


@dataclass(frozen=True, order=True)
class MappingKey:
    """What a mapping matches: ``(public_ip, proto, port)``; unique across the cloud."""

    public_ip: IPv4Address
    proto: Proto
    port: int
    # Keys are hashed over and over (every compile and every delta looks up 100,000 of them, and
    # IPv4Address hashes through hex()): computed once. Not part of equality or order.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((int(self.public_ip), self.proto, self.port)))

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return f"{self.public_ip!s}:{self.port}/{self.proto.value}"  # !s: IPv4Address.__format__ is slow


class HealthKind(enum.StrEnum):
    """How a backend's health is checked: a TCP connect, or an HTTP GET with an expected status."""

    TCP = "tcp"
    HTTP = "http"


@dataclass(frozen=True)
class HealthCheck:
    """A mapping's health check, run by the agent on each backend's host inside the backend's namespace.

    A backend is marked down after ``threshold`` failed checks in a row and up again after
    ``threshold`` good ones, so one lost SYN does not move connections; a down backend gets
    no new connections within ``interval * threshold`` (plus the check's ``timeout``).
    ``port`` 0 means the mapping's own port.
    """

    kind: HealthKind = HealthKind.TCP
    port: int = 0
    path: str = "/"  # http only
    expect: int = 200  # http only: the status that counts as healthy
    interval: float = 2.0  # seconds between two checks of one backend
    timeout: float = 1.0  # seconds one check may take
    threshold: int = 2


@dataclass(frozen=True)
class Backend:
    """One container behind a mapping, with its share of new connections (relative ``weight``)."""

    container: str
    weight: int = 1


@dataclass(frozen=True)
class Mapping:
    """``(public_ip, proto, port) → container``: the heart of the design.

    A mapping may name several ``backends`` (load balancing, issue 15): every one carries the
    public IP itself, the switch only picks the destination MAC per connection, and replies go
    straight from the backend to the client (direct server return). ``container`` is always the
    first backend, so a plain mapping is ``Mapping(key, container)`` as before.

    ``allow``/``deny``: source networks allowed or denied (the firewall, enforced before the
    mapping); see :meth:`permits`. ``health``: the backends' health check, if any. ``down``: the
    backends whose check fails right now (reported by their agents, not chosen by a user).
    """

    key: MappingKey
    container: str
    backends: tuple[Backend, ...] = ()
    allow: tuple[IPv4Network, ...] = ()
    deny: tuple[IPv4Network, ...] = ()
    health: HealthCheck | None = None
    down: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.backends:
            object.__setattr__(self, "backends", (Backend(self.container),))
        elif self.backends[0].container != self.container:
            raise ValueError(f"mapping {self.key}: container {self.container!r} is not its first backend")

    @property
    def balanced(self) -> bool:
        """True if the mapping spreads connections over several backends."""
        return len(self.backends) > 1

    @property
    def names(self) -> tuple[str, ...]:
        """The backends' container names, in order."""
        return tuple(b.container for b in self.backends)

    def serving(self) -> tuple[Backend, ...]:
        """The backends that take new connections: those not down. Empty if every one is down: the
        mapping then refuses new connections as an unmapped port does (strict, never fail-open)."""
        if not self.down:
            return self.backends
        return tuple(b for b in self.backends if b.container not in self.down)

    @property
    def filtered(self) -> bool:
        """True if the mapping carries a firewall policy (an allow or a deny list)."""
        return bool(self.allow or self.deny)

    def permits(self, source: IPv4Address) -> bool:
        """The policy's meaning: a denied source never passes; with an allow list only its sources
        pass; without one everybody does (a mapped port is open by default)."""
        if any(source in net for net in self.deny):
            return False
        return not self.allow or any(source in net for net in self.allow)

    @property
    def public_ip(self) -> IPv4Address:
        return self.key.public_ip

    @property
    def proto(self) -> Proto:
        return self.key.proto

    @property
    def port(self) -> int:
        return self.key.port


@dataclass(frozen=True)
class DesiredState:
    """One consistent snapshot of everything the cloud should be.

    ``generation`` increases with every write to the store; a switch or agent
    that has realised a snapshot reports its generation back (``--wait``).
    """

    generation: int = 0
    hosts: dict[str, Host] = field(default_factory=dict)
    containers: dict[str, Container] = field(default_factory=dict)
    mappings: dict[MappingKey, Mapping] = field(default_factory=dict)
    config: NetworkConfig = DEFAULT_CONFIG

    def gateway_for(self, host: str) -> str | None:
        """The host whose kernel is ``host``'s containers' way out: ``host`` itself if it is a gateway
        (or if the cloud has no gateway host), else the first gateway host by name. None if ``host``
        is unknown. One gateway per compute host for now; several (highly available) come later."""
        me = self.hosts.get(host)
        if me is None:
            return None
        if me.role is HostRole.GATEWAY:
            return host
        gateways = sorted(h.name for h in self.hosts.values() if h.role is HostRole.GATEWAY)
        return gateways[0] if gateways else host

    def peers_of(self, host: str) -> list[Host]:
        """The other hosts ``host`` keeps a tunnel to: every other host with an underlay address, by name."""
        me = self.hosts.get(host)
        if me is None or me.underlay_ip is None:
            return []
        return sorted((h for h in self.hosts.values() if h.name != host and h.underlay_ip is not None),
                      key=lambda h: h.name)

    def containers_on(self, host: str) -> list[Container]:
        """Containers placed on ``host``, in name order (stable output)."""
        return sorted((c for c in self.containers.values() if c.host == host), key=lambda c: c.name)

    def mappings_of(self, container: str) -> list[Mapping]:
        """Mappings that have ``container`` among their backends, in key order."""
        return sorted((m for m in self.mappings.values() if container in m.names), key=lambda m: m.key)

    def public_ips(self) -> set[IPv4Address]:
        """Every public IP held by some container."""
        return {ip for c in self.containers.values() for ip in c.ips}


def port_name_for(container_name: str) -> str:
    """Deterministic bridge-port name for a container: ``pm`` + 12 hex digits.

    Interface names are limited to 15 characters, container names are not, so
    the name is a digest; the controller finds the container's OpenFlow port by it.
    """
    return "pm" + hashlib.blake2b(container_name.encode(), digest_size=6).hexdigest()


def tunnel_port_for(host_name: str) -> str:
    """Deterministic name of the VXLAN device leading to ``host_name``: ``vx`` + 12 hex digits (<=15 chars).

    The same on every host, so the controller finds on each switch the port that leads to a host by name.
    """
    return "vx" + hashlib.blake2b(b"tunnel:" + host_name.encode(), digest_size=6).hexdigest()


def is_tunnel_port(name: str) -> bool:
    """True for a name :func:`tunnel_port_for` could have made."""
    return len(name) == 14 and name.startswith("vx") and all(ch in "0123456789abcdef" for ch in name[2:])


def mac_for(container_name: str) -> str:
    """A stable, locally administered unicast MAC derived from the container name."""
    digest = hashlib.blake2b(b"mac:" + container_name.encode(), digest_size=5).digest()
    return "02:" + ":".join(f"{b:02x}" for b in digest)


class RunState(enum.StrEnum):
    """What the host agent last saw of a container (status, written by the agent)."""

    PENDING = "pending"
    RUNNING = "running"
    EXITED = "exited"
    ERROR = "error"


@dataclass(frozen=True)
class ContainerStatus:
    """Realised state of a container, reported by its host's agent.

    ``netns`` names the network namespace the agent plumbed (what ``exec`` enters),
    ``pid`` is the container's main process, ``message`` explains an error,
    ``log_path`` is the file its output goes to on its host ("" if the runtime has none).
    ``exit_code`` is the last exit code of its process (None: never exited, or not known),
    ``restarts`` how often the runtime started it again after it exited (restart policy),
    ``runtime`` which runtime runs it: ``light`` or ``image`` (what ``exec`` needs to enter it).
    """

    state: RunState = RunState.PENDING
    netns: str = ""
    pid: int | None = None
    message: str = ""
    log_path: str = ""
    exit_code: int | None = None
    restarts: int = 0
    runtime: str = ""


@dataclass(frozen=True)
class MappingCounters:
    """What a mapping let through and what its policy dropped, summed over every switch (the master
    controller reads them from the flows and writes them to the store)."""

    allowed_packets: int = 0
    allowed_bytes: int = 0
    denied_packets: int = 0
    denied_bytes: int = 0


@dataclass(frozen=True)
class HostStatus:
    """How far a host has caught up: the generation its switch and its agent have realised.

    ``switch_waiting`` names the host's containers whose flows the switch could not hold at
    ``switch_generation`` because their port was not on the bridge yet (a container still
    starting, or one that cannot start). The controller reports the generation anyway, so one
    broken container never holds back every write on its host; whoever waits for a particular
    container checks that it is not in this set (see docs/components.md, "Waiting").
    """

    switch_generation: int = 0
    agent_generation: int = 0
    switch_connected: bool = False
    switch_waiting: frozenset[str] = frozenset()
    tunnels: tuple[tuple[str, str], ...] = ()  # (peer host, "up" | "down: reason"), reported by the agent
    # The agent's lease (schema 1.9.0): a counter it bumps every --heartbeat-interval, whatever its
    # work; readers time its moves with their own clock (no clock is shared between machines).
    heartbeat: int = 0
    datapath: str | None = None  # "ovs" | "ebpf", as the agent says; None: never said (an older agent)
