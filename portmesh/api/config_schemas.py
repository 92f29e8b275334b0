"""Wire shapes of the configuration and public-pool endpoints (``/v1/config``, ``/v1/pools``).

Apart from the rest of :mod:`portmesh.api.schemas` because they describe the cloud's one
Global row rather than hosts, containers or mappings, and because they state the network
value patterns (CIDRs, link-local addresses, MTUs, VXLAN ids) nothing else uses. They share
that module's pieces (:data:`IP_DOC`, :func:`json_integer`, :class:`WriteOut`) so every write
answers the same way.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, Field

from portmesh.api.schemas import IP_DOC, WriteOut, json_integer
from portmesh.model.config import NetworkConfig


class ConfigOut(BaseModel):
    """The cloud's network configuration (the store's Global row)."""

    public_pools: list[str]
    gateway_ip: str
    gateway_prefix: int
    gateway_mac: str
    virtual_mac: str
    ephemeral_start: int
    ephemeral_end: int
    block_size: int
    container_mtu: int
    egress_mtu: int = Field(description="MTU of each host's bridge port (br0), fixed: see docs/components.md")
    protected_networks: list[str]
    vxlan_vni: int
    vxlan_port: int

    @classmethod
    def of(cls, config: NetworkConfig) -> ConfigOut:
        return cls(
            public_pools=[str(p) for p in config.public_pools],
            gateway_ip=str(config.gateway_ip),
            gateway_prefix=config.gateway_prefix,
            gateway_mac=config.gateway_mac,
            virtual_mac=config.virtual_mac,
            ephemeral_start=config.ephemeral_start,
            ephemeral_end=config.ephemeral_end,
            block_size=config.block_size,
            container_mtu=config.container_mtu,
            egress_mtu=config.bridge_port_mtu,
            protected_networks=[str(n) for n in config.protected_networks],
            vxlan_vni=config.vxlan_vni,
            vxlan_port=config.vxlan_port,
        )


OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# An IPv4 network as the API reads it (host bits are refused by the API, which no pattern can say).
CIDR_PATTERN = rf"^({OCTET}\.){{3}}{OCTET}/(3[0-2]|[12]?[0-9])$"
LINK_LOCAL_PATTERN = rf"^169\.254\.{OCTET}\.{OCTET}$"
BLOCK_SIZES = [2**n for n in range(6, 16)]


# Bounds inside the type, so that ``X | None`` states them in the document (a Field on the union would not).
BlockSize = Annotated[int, Field(ge=64, le=32768, json_schema_extra={"enum": BLOCK_SIZES}), BeforeValidator(json_integer)]
Mtu = Annotated[int, Field(ge=576, le=9000), BeforeValidator(json_integer)]
Vni = Annotated[int, Field(ge=1, le=2**24 - 1), BeforeValidator(json_integer)]
UdpPort = Annotated[int, Field(ge=1, le=65535), BeforeValidator(json_integer)]
LinkLocal = Annotated[str, Field(json_schema_extra={**IP_DOC, "pattern": LINK_LOCAL_PATTERN})]
Cidr = Annotated[str, Field(json_schema_extra={"pattern": CIDR_PATTERN})]


class ConfigPatch(BaseModel, extra="forbid"):
    """Fields to change; absent ones keep their value. Refused (409) while containers exist,
    unless unchanged: containers are plumbed with the old values. Pools: ``/v1/pools``."""

    gateway_ip: LinkLocal | None = Field(default=None, description="link-local next hop of every container (169.254.0.0/16)")
    block_size: BlockSize | None = Field(default=None, description="ports per container block, a power of two")
    container_mtu: Mtu | None = Field(default=None, description="underlay MTU - 50 (VXLAN)")
    protected_networks: list[Cidr] | None = Field(
        default=None,
        description="management and underlay networks containers never reach (CIDRs, /8 or longer, no host bits)",
    )
    vxlan_vni: Vni | None = None
    vxlan_port: UdpPort | None = None


class ConfigWriteOut(WriteOut):
    config: ConfigOut


class PoolIn(BaseModel):
    """A public pool to add: an IPv4 network (CIDR, no host bits) the cloud is routed."""

    pool: str = Field(
        description="e.g. 203.0.113.0/24: /8 or longer, no host bits, public unicast", json_schema_extra={"pattern": CIDR_PATTERN}
    )


class PoolOut(BaseModel):
    """A public pool and the IPs of it containers hold."""

    pool: str
    size: int = Field(description="addresses in it")
    used: int = Field(description="addresses of it held by containers")


class PoolWriteOut(WriteOut):
    pool: PoolOut
