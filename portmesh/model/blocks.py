"""Allocation of aligned ephemeral-port blocks to containers that share public IPs.

Each container owns one block (``NetworkConfig.block_size`` ports, aligned to
its size) that is free on every one of its IPs. The container's kernel picks
source ports only from it (``ip_local_port_range``), and the switch maps a
reply's destination port back with one masked flow: no learning, no collision
between sharers, no way to claim a neighbour's port.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from portmesh.model.config import NetworkConfig
from portmesh.model.entities import DesiredState, PortBlock
from portmesh.model.errors import Conflict


def candidate_blocks(config: NetworkConfig) -> list[PortBlock]:
    """Every aligned block inside the configured ephemeral range, lowest first."""
    size = config.block_size
    if size <= 0 or size & (size - 1):
        raise ValueError(f"block_size {size} is not a power of two")
    first = -(-config.ephemeral_start // size) * size
    return [PortBlock(start, size) for start in range(first, config.ephemeral_end - size + 2, size)]


def allocate_block(state: DesiredState, config: NetworkConfig, ips: list[IPv4Address]) -> PortBlock:
    """The lowest block free on every IP in ``ips`` and holding none of their mapped ports."""
    wanted = set(ips)
    taken = {c.block for c in state.containers.values() if wanted & set(c.ips)}
    mapped_ports = [m.port for m in state.mappings.values() if m.public_ip in wanted]
    for block in candidate_blocks(config):
        if block not in taken and not any(port in block for port in mapped_ports):
            return block
    raise Conflict("ips", f"no free ephemeral port block of {config.block_size} ports left on {', '.join(map(str, ips))}")
