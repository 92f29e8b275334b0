"""Wire shapes of the HTTP API (pydantic), and their conversion from model values.

Requests carry addresses and protocols as plain strings: the model's parsers
(:mod:`portmesh.model.validation`) turn them into values and name the offending
field when they refuse, so every refusal has the same body whatever layer made it.
Responses are built from model values only here, so routes never hand-build JSON.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from portmesh.model.entities import Container, ContainerStatus, Host, HostStatus, Mapping, PortBlock


class ErrorDetail(BaseModel):
    """Why a request was refused: the input field at fault and the reason in words."""

    field: str | None
    reason: str


class ErrorBody(BaseModel):
    """Body of every 4xx/5xx answer."""

    detail: ErrorDetail


class HostIn(BaseModel):
    """A host to register; ``datapath_id`` defaults to the lowest one not in use."""

    name: str
    datapath_id: int | None = Field(default=None, ge=1, le=2**64 - 1)
    underlay_ip: str | None = None


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
    """A registered host and how far it has caught up."""

    name: str
    datapath_id: int
    underlay_ip: str | None
    status: HostStatusOut | None = None

    @classmethod
    def of(cls, host: Host, status: HostStatus | None = None) -> HostOut:
        return cls(
            name=host.name,
            datapath_id=host.datapath_id,
            underlay_ip=str(host.underlay_ip) if host.underlay_ip is not None else None,
            status=HostStatusOut.of(status) if status is not None else None,
        )


class PortIn(BaseModel):
    """One service port of a container: mapped on every one of its IPs."""

    port: int | str
    proto: str = "tcp"


class ContainerIn(BaseModel):
    """A container to create, with the mappings ``ips x ports`` created alongside it."""

    name: str
    host: str
    ips: list[str]
    ports: list[PortIn] = Field(default_factory=list)
    command: list[str] = Field(default_factory=list)
    image: str | None = None


class BlockOut(BaseModel):
    """A container's ephemeral source-port block."""

    start: int
    end: int
    size: int

    @classmethod
    def of(cls, block: PortBlock) -> BlockOut:
        return cls(start=block.start, end=block.end, size=block.size)


class MappingIn(BaseModel):
    """``(public_ip, proto, port) → container``."""

    public_ip: str
    port: int | str
    proto: str = "tcp"
    container: str


class MappingOut(BaseModel):
    """An existing mapping."""

    public_ip: str
    proto: str
    port: int
    container: str

    @classmethod
    def of(cls, mapping: Mapping) -> MappingOut:
        return cls(
            public_ip=str(mapping.public_ip),
            proto=mapping.proto.value,
            port=mapping.port,
            container=mapping.container,
        )


class ContainerStatusOut(BaseModel):
    """What the host agent last reported about a container."""

    state: str
    netns: str
    pid: int | None
    message: str

    @classmethod
    def of(cls, status: ContainerStatus) -> ContainerStatusOut:
        return cls(state=status.state.value, netns=status.netns, pid=status.pid, message=status.message)


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


class StatusOut(BaseModel):
    """The store's generation and how far every host has caught up with it."""

    generation: int
    converged: bool
    hosts: list[HostProgress]


class WriteOut(BaseModel):
    """Answer to every write: the generation it produced, and whether it is live everywhere yet."""

    generation: int
    converged: bool


class HostWriteOut(WriteOut):
    host: HostOut


class ContainerWriteOut(WriteOut):
    container: ContainerOut


class MappingWriteOut(WriteOut):
    mapping: MappingOut
