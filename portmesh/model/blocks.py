"""Allocation of aligned ephemeral-port blocks to containers that share public IPs.

Each container owns one block (``NetworkConfig.block_size`` ports, aligned to
its size) that is free on every one of its IPs. The container's kernel picks
source ports only from it (``ip_local_port_range``), and the switch maps a
reply's destination port back with one masked flow: no learning, no collision
between sharers, no way to claim a neighbour's port.

The store holds one claim per (public IP, block) under a unique index, so two
writers (two API instances) that pick the same block cannot both commit: the
second gets :class:`BlockTaken` and picks again with that block excluded
(:func:`allocate_block`'s ``exclude``), a bounded number of times.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from portmesh.model.config import NetworkConfig
from portmesh.model.entities import DesiredState, PortBlock
from portmesh.model.errors import Conflict

# How many blocks a create tries before it answers 409: each attempt lost only
# because another writer committed that very block at the same moment.
CLAIM_ATTEMPTS = 8
# A retry takes a random one of the first ``CLAIM_SPREAD * attempt`` free blocks (see allocate_block).
CLAIM_SPREAD = 8


class BlockTaken(Conflict):
    """The block was claimed on one of the IPs by another writer meanwhile (the store's index said so).

    A :class:`Conflict` (409) if it reaches a caller; the API retries with the next block first.
    """


def candidate_blocks(config: NetworkConfig) -> list[PortBlock]:
    """Every aligned block inside the configured ephemeral range, lowest first."""
    size = config.block_size
    if size <= 0 or size & (size - 1):
        raise ValueError(f"block_size {size} is not a power of two")
    first = -(-config.ephemeral_start // size) * size
    return [PortBlock(start, size) for start in range(first, config.ephemeral_end - size + 2, size)]


def allocate_block(
    state: DesiredState,
    config: NetworkConfig,
    ips: list[IPv4Address],
    exclude: frozenset[PortBlock] = frozenset(),
    nth: int = 0,
) -> PortBlock:
    """The lowest block free on every IP in ``ips``, holding none of their mapped ports, not in ``exclude``.

    ``exclude``: blocks the store refused moments ago (claimed by another writer whose
    claim ``state`` may not show yet), so a retry does not pick the same one again.
    ``nth``: take the nth free block instead (the last one if fewer are free). Writers
    that all retry with the lowest free block collide again in lockstep; a retry with a
    random ``nth`` spreads them out.
    """
    wanted = set(ips)
    taken = {c.block for c in state.containers.values() if wanted & set(c.ips)} | exclude
    mapped_ports = [m.port for m in state.mappings.values() if m.public_ip in wanted]
    found: PortBlock | None = None
    for block in candidate_blocks(config):
        if block not in taken and not any(port in block for port in mapped_ports):
            found = block
            if nth <= 0:
                return block
            nth -= 1
    if found is not None:
        return found
    raise Conflict("ips", f"no free ephemeral port block of {config.block_size} ports left on {', '.join(map(str, ips))}")
