"""Wire shapes of the HTTP API (pydantic), and their conversion from model values.

Requests carry addresses and protocols as plain strings: the model's parsers
(:mod:`portmesh.model.validation`) turn them into values and name the offending
field when they refuse, so every refusal has the same body whatever layer made it.
Responses are built from model values only here, so routes never hand-build JSON.
The network configuration and public pools have their own module,
:mod:`portmesh.api.config_schemas`, built on the shared pieces defined here.
"""

from __future__ import annotations

from collections.abc import Mapping as MappingABC
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field

from portmesh.model.entities import (
    DEFAULT_STOP_TIMEOUT,
    Container,
    ContainerStatus,
    HealthCheck,
    Host,
    HostRole,
    HostStatus,
    Mapping,
    MappingCounters,
    PortBlock,
    RestartPolicy,
)
from portmesh.model.validation import (
    ENV_KEY_RE,
    IMAGE_RE,
    MAX_BACKENDS,
    MAX_POLICY_NETWORKS,
    MAX_STOP_TIMEOUT,
    MAX_WEIGHT,
    NAME_RE,
)

# The OpenAPI document states the shape the model's parsers accept, so a client (and
# schemathesis) can tell valid input from invalid without trying. The parsers stay the
# judges of strings (their refusals name the field); these only document them.
NAME_DOC: dict[str, Any] = {"pattern": NAME_RE.pattern, "minLength": 1, "maxLength": 63}
IP_DOC: dict[str, Any] = {"format": "ipv4"}
IPS_DOC: dict[str, Any] = {"minItems": 1, "uniqueItems": True, "items": {"type": "string", **IP_DOC}}
# KEY=VALUE, the value any text but NUL (it cannot reach a process's environment). Lone surrogates are
# refused too (parse_env); not stated here, as a surrogate range is not portable across regex engines.
ENV_PATTERN = f"^{ENV_KEY_RE.pattern}=[^\\x00]*$"
PROTO_DOC: dict[str, Any] = {"pattern": "^([tT][cC][pP]|[uU][dD][pP])$", "default": "tcp"}


def name_field(description: str) -> Any:
    return Field(description=description, json_schema_extra=NAME_DOC)


# Datapath ids this API takes: exact in every JSON parser (doubles hold integers to 2**53) and
# within the store's signed 64-bit integer. Real ones are 48-bit (MAC-derived) or small.
MAX_DATAPATH_ID = 2**53 - 1


def json_integer(value: object) -> object:
    """Let only JSON numbers through to int parsing: ``"80"`` and ``true`` are not ports (``80.0`` is one)."""
    if isinstance(value, str | bool):
        raise ValueError("a JSON integer is required")
    return value


Port = Annotated[int, Field(ge=1, le=65535, description="TCP/UDP port number"), BeforeValidator(json_integer)]


class ErrorDetail(BaseModel):
    """Why a request was refused: the input field at fault and the reason in words."""

    field: str | None
    reason: str


class ErrorBody(BaseModel):
    """Body of every 4xx/5xx answer."""

    detail: ErrorDetail


ROLE_DOC: dict[str, Any] = {"enum": [r.value for r in HostRole]}


class HostIn(BaseModel):
    """A host to register; ``datapath_id`` defaults to the lowest one not in use."""

    name: str = name_field("host name")
    datapath_id: int | None = Field(default=None, ge=1, le=MAX_DATAPATH_ID)
    underlay_ip: str | None = Field(
        default=None,
        description="where the other hosts' VXLAN tunnels end: not in a public pool, unique among hosts",
        json_schema_extra=IP_DOC,
    )
    role: str | None = Field(
        default=None,
        description="gateway (faces the outside) or compute; default: gateway if the cloud has none yet, else compute",
        json_schema_extra=ROLE_DOC,
    )


class TunnelOut(BaseModel):
    """One of a host's VXLAN tunnels to a peer, as its agent reports it."""

    peer: str
    up: bool
    state: str = Field(description='"up" or "down: <reason>"')


class LagOut(BaseModel):
    """A host a write did not wait for (it does not concern it and the host is down), and why."""

    host: str
    reason: str


class HostStatusOut(BaseModel):
    """The generation a host's switch and agent have realised."""

    switch_generation: int
    agent_generation: int
    switch_connected: bool

    @classmethod
    def of(cls, status: HostStatus) -> HostStatusOut:
        return cls(
            switch_generation=status.switch_generation,
            agent_generation=status.agent_generation,
            switch_connected=status.switch_connected,
        )


class HostOut(BaseModel):
    """A registered host, its tunnels and containers, and how far it has caught up."""

    name: str
    datapath_id: int
    underlay_ip: str | None
    role: str = HostRole.GATEWAY.value
    containers: int = Field(default=0, description="containers placed on it")
    tunnels: list[TunnelOut] = Field(default_factory=list, description="to its peers, as its agent last reported")
    status: HostStatusOut | None = None
    drops: dict[str, int] = Field(
        default_factory=dict,
        description="an eBPF host's datapath drops by reason (packets), as its agent last reported; empty on OVS",
    )
    datapath: str | None = Field(default=None, description="ovs or ebpf, as the host's agent says; null: not said")
    down: str | None = Field(default=None, description="why the host counts as down (as in /v1/status); null if not")
    agent_dead: str | None = Field(default=None, description="why its agent counts as dead (no heartbeat); null if alive")

    @classmethod
    def of(cls, host: Host, status: HostStatus | None = None, containers: int = 0,
           drops: dict[str, int] | None = None, down: str | None = None, agent_dead: str | None = None) -> HostOut:
        tunnels = [TunnelOut(peer=peer, up=state == "up", state=state) for peer, state in (status.tunnels if status else ())]
        return cls(
            name=host.name,
            datapath_id=host.datapath_id,
            underlay_ip=str(host.underlay_ip) if host.underlay_ip is not None else None,
            role=host.role.value,
            containers=containers,
            tunnels=tunnels,
            status=HostStatusOut.of(status) if status is not None else None,
            drops=dict(drops or {}),
            datapath=status.datapath if status is not None else None,
            down=down,
            agent_dead=agent_dead,
        )


class PortIn(BaseModel):
    """One service port of a container: mapped on every one of its IPs."""

    port: Port
    proto: str = Field(default="tcp", json_schema_extra=PROTO_DOC)


class ContainerIn(BaseModel):
    """A container to create, with the mappings ``ips x ports`` created alongside it."""

    name: str | None = Field(
        default=None,
        description="container name; generated as Docker does (adjective_surname) if absent",
        json_schema_extra=NAME_DOC,
    )
    host: str | None = Field(
        default=None,
        description="host to place it on; if absent, the host with the fewest containers (ties by name)",
        json_schema_extra=NAME_DOC,
    )
    ips: list[str] = Field(description="public IPs it holds", json_schema_extra=IPS_DOC)
    ports: list[PortIn] = Field(default_factory=list, description="mapped on every IP; a port listed twice is one mapping")
    command: list[str] = Field(default_factory=list)
    image: str | None = Field(default=None, json_schema_extra={"pattern": f"^{IMAGE_RE.pattern}$"})
    env: list[str] = Field(
        default_factory=list,
        description="KEY=VALUE for the command's environment (docker run -e); KEY a letter or '_', then letters, digits, '_'",
        json_schema_extra={"items": {"type": "string", "pattern": ENV_PATTERN}},
    )
    restart: str = Field(
        default="no",
        description="restart policy when the process exits, as Docker's: no, on-failure (non-zero exit), always",
        json_schema_extra={"enum": [p.value for p in RestartPolicy]},
    )
    stop_timeout: int = Field(
        default=DEFAULT_STOP_TIMEOUT,
        ge=0,
        le=MAX_STOP_TIMEOUT,
        description="seconds a stop waits after SIGTERM before SIGKILL (docker --stop-timeout)",
    )


class BlockOut(BaseModel):
    """A container's ephemeral source-port block."""

    start: int
    end: int
    size: int

    @classmethod
    def of(cls, block: PortBlock) -> BlockOut:
        return cls(start=block.start, end=block.end, size=block.size)


NETS_DOC: dict[str, Any] = {"items": {"type": "string", "pattern": r"^[0-9./]{7,18}$"}, "maxItems": MAX_POLICY_NETWORKS}
Weight = Annotated[int, Field(ge=1, le=MAX_WEIGHT), BeforeValidator(json_integer)]
WholeNumber = Annotated[int, BeforeValidator(json_integer)]


class HealthIn(BaseModel, extra="forbid"):
    """A mapping's health check: ``tcp`` (a connect) or ``http`` (a GET of ``path`` answered with
    ``expect``), run by each backend's agent inside the backend's namespace. The model's
    :func:`parse_health` judges every part and names it (``health.interval``)."""

    kind: str = Field(description="tcp or http", json_schema_extra={"enum": ["tcp", "http"]})
    port: WholeNumber = Field(default=0, ge=0, le=65535, description="port checked; 0: the mapping's own")
    path: str = Field(default="/", description="http: the path asked for")
    expect: WholeNumber = Field(default=200, ge=100, le=599, description="http: the status that counts as healthy")
    interval: float = Field(default=2.0, ge=0.2, le=3600, description="seconds between two checks of a backend")
    timeout: float = Field(default=1.0, ge=0.05, le=60, description="seconds one check may take (at most the interval)")
    threshold: WholeNumber = Field(
        default=2, ge=1, le=10, description="failed (good) checks in a row before a backend is down (up again)"
    )


class MappingIn(BaseModel):
    """``(public_ip, proto, port) → container``, or several ``backends`` (load balanced by weight),
    with an optional firewall policy (``allow``/``deny`` source networks) and health check."""

    public_ip: str = Field(json_schema_extra=IP_DOC)
    port: Port
    proto: str = Field(default="tcp", json_schema_extra=PROTO_DOC)
    container: str | None = Field(
        default=None,
        description="container that answers (or give backends; both only if it is backends[0])",
        json_schema_extra=NAME_DOC,
    )
    backends: list[str] | None = Field(
        default=None,
        description="containers that share the mapping's new connections, the first being 'container'",
        json_schema_extra={"minItems": 1, "maxItems": MAX_BACKENDS, "uniqueItems": True, "items": NAME_DOC},
    )
    weights: dict[str, Weight] = Field(
        default_factory=dict, description="backend -> relative share of new connections (default 1)"
    )
    allow: list[str] = Field(
        default_factory=list, description="only these source networks may connect (empty: all)", json_schema_extra=NETS_DOC
    )
    deny: list[str] = Field(
        default_factory=list, description="these source networks may not (deny wins over allow)", json_schema_extra=NETS_DOC
    )
    health: HealthIn | None = None


class MappingPatch(BaseModel, extra="forbid"):
    """What to change of a mapping; absent fields keep their value. ``allow: []`` opens the mapping
    to all, ``health: null`` removes the check, ``weights`` sets the named backends' weights."""

    allow: list[str] | None = Field(default=None, json_schema_extra=NETS_DOC)
    deny: list[str] | None = Field(default=None, json_schema_extra=NETS_DOC)
    health: HealthIn | None = None
    weights: dict[str, Weight] | None = None


class BackendIn(BaseModel, extra="forbid"):
    """One more backend for an existing mapping."""

    container: str = name_field("container to add: it must hold the mapping's public IP")
    weight: Weight = 1


class BackendOut(BaseModel):
    """A backend, its weight, and its health as its agent last reported it."""

    container: str
    weight: int
    health: str = Field(description='"up", "down: <reason>", or "unchecked" (no check, or not reported yet)')


class HealthOut(BaseModel):
    kind: str
    port: int
    path: str
    expect: int
    interval: float
    timeout: float
    threshold: int

    @classmethod
    def of(cls, h: HealthCheck) -> HealthOut:
        return cls(
            kind=h.kind.value,
            port=h.port,
            path=h.path,
            expect=h.expect,
            interval=h.interval,
            timeout=h.timeout,
            threshold=h.threshold,
        )


class CountersOut(BaseModel):
    """Packets and bytes the mapping let through and its policy dropped, over every switch."""

    allowed_packets: int
    allowed_bytes: int
    denied_packets: int
    denied_bytes: int

    @classmethod
    def of(cls, c: MappingCounters) -> CountersOut:
        return cls(
            allowed_packets=c.allowed_packets,
            allowed_bytes=c.allowed_bytes,
            denied_packets=c.denied_packets,
            denied_bytes=c.denied_bytes,
        )


def backend_health(mapping: Mapping, reported: MappingABC[str, str], name: str) -> str:
    """One backend's health word: what its agent reported, else "down" if the store says so, else "unchecked"."""
    word = reported.get(name)
    if word:
        return word
    return "down" if name in mapping.down else "unchecked"


class MappingOut(BaseModel):
    """An existing mapping: its backends with weight and health, its policy, health check and counters."""

    public_ip: str
    proto: str
    port: int
    container: str = Field(description="the first backend")
    backends: list[BackendOut] = Field(default_factory=list)
    allow: list[str] = Field(default_factory=list)
    deny: list[str] = Field(default_factory=list)
    health: HealthOut | None = None
    counters: CountersOut | None = Field(default=None, description="read one mapping to get them (null in lists)")

    @classmethod
    def of(
        cls, mapping: Mapping, health: MappingABC[str, str] | None = None, counters: MappingCounters | None = None
    ) -> MappingOut:
        reported = health or {}
        return cls(
            public_ip=str(mapping.public_ip),
            proto=mapping.proto.value,
            port=mapping.port,
            container=mapping.container,
            backends=[
                BackendOut(container=b.container, weight=b.weight, health=backend_health(mapping, reported, b.container))
                for b in mapping.backends
            ],
            allow=[str(n) for n in mapping.allow],
            deny=[str(n) for n in mapping.deny],
            health=HealthOut.of(mapping.health) if mapping.health is not None else None,
            counters=CountersOut.of(counters) if counters is not None else None,
        )


class ContainerStatusOut(BaseModel):
    """What the host agent last reported about a container."""

    state: str
    netns: str
    pid: int | None
    message: str
    log_path: str = ""
    exit_code: int | None = Field(default=None, description="last exit code of its process (None: not exited or unknown)")
    restarts: int = Field(default=0, description="times the runtime started it again after it exited (restart policy)")
    runtime: str = Field(default="", description="'light' or 'image': how `exec` enters it (pid: its main process)")

    @classmethod
    def of(cls, status: ContainerStatus) -> ContainerStatusOut:
        return cls(
            state=status.state.value,
            netns=status.netns,
            pid=status.pid,
            message=status.message,
            log_path=status.log_path,
            exit_code=status.exit_code,
            restarts=status.restarts,
            runtime=status.runtime,
        )


class LogsOut(BaseModel):
    """Part of a container's output, the offset to ask from next, and whether it still runs (``logs -f``)."""

    name: str
    path: str
    offset: int
    text: str
    running: bool = False


class ContainerOut(BaseModel):
    """A container: its desired shape, desired run state, reported status and mappings."""

    name: str
    host: str
    mac: str
    port_name: str
    ips: list[str]
    block: BlockOut
    command: list[str]
    image: str | None
    env: list[str] = Field(default_factory=list)
    restart: str = "no"
    stop_timeout: int = DEFAULT_STOP_TIMEOUT
    running: bool
    status: ContainerStatusOut | None
    mappings: list[MappingOut]

    @classmethod
    def of(cls, c: Container, *, running: bool, status: ContainerStatus | None, mappings: list[Mapping]) -> ContainerOut:
        return cls(
            name=c.name,
            host=c.host,
            mac=c.mac,
            port_name=c.port_name,
            ips=[str(ip) for ip in c.ips],
            block=BlockOut.of(c.block),
            command=list(c.command),
            image=c.image,
            env=list(c.env),
            restart=c.restart.value,
            stop_timeout=c.stop_timeout,
            running=running,
            status=ContainerStatusOut.of(status) if status is not None else None,
            mappings=[MappingOut.of(m) for m in mappings],
        )


class HostProgress(BaseModel):
    """One host's line in ``/v1/status``."""

    name: str
    switch_generation: int
    agent_generation: int
    switch_connected: bool
    converged: bool
    waiting: list[str] = Field(default_factory=list, description="containers starting: their flows wait for their port")
    down: str | None = Field(
        default=None, description="why the host counts as down (switch disconnected, agent silent or, eBPF, dead); null if not"
    )
    agent_dead: str | None = Field(default=None, description="why its agent counts as dead (no heartbeat); OVS: not down")


class ContainerProblem(BaseModel):
    """A container that does not run although desired to: in error, or exited (with its reason)."""

    name: str
    host: str
    state: str
    message: str


class StatusOut(BaseModel):
    """The store's generation and how far every host has caught up with it.

    ``converged`` means everything that can be realised is realised; containers that cannot
    run are listed in ``problems`` and do not hold it back.
    """

    generation: int
    converged: bool
    hosts: list[HostProgress]
    problems: list[ContainerProblem] = Field(default_factory=list)
    lagging: list[LagOut] = Field(
        default_factory=list, description="hosts behind and down; a write that does not concern them does not wait for them"
    )


class WriteOut(BaseModel):
    """Answer to every write: the generation it produced, whether it is live on the hosts it concerns
    (and on every host that is up), and the hosts that are down and were not waited for."""

    generation: int
    converged: bool
    lagging: list[LagOut] = Field(default_factory=list, description="hosts down, not waited for: the write is not live there")


class HostWriteOut(WriteOut):
    host: HostOut


class ContainerWriteOut(WriteOut):
    container: ContainerOut
    notes: list[str] = Field(default_factory=list, description="what the API chose: a generated name, a host")


class MappingWriteOut(WriteOut):
    mapping: MappingOut
