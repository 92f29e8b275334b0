"""The cloud's configuration and public pools as the API changes them: pure checks against a snapshot.

The configuration lives in the store's Global row (``state.config``); every component reads it
from there. A change is checked here against the snapshot it will replace, and refused naming the
field: 422 for a value that is wrong whatever the state, 409 for one the state forbids (a pool
overlapping another, a pool a container holds an IP of, a plumbing value while containers exist).
"""

from __future__ import annotations

import dataclasses
from ipaddress import AddressValueError, IPv4Network, NetmaskValueError

from portmesh.api.config_schemas import ConfigPatch, PoolOut
from portmesh.model.config import NetworkConfig
from portmesh.model.entities import DesiredState
from portmesh.model.errors import Conflict, InvalidInput, NotFound
from portmesh.model.validation import parse_ip

# Ranges that can never be public pools: "this network", loopback, link-local (the gateway and
# clouds' metadata service live there), multicast and the reserved 240/4 (broadcast included).
UNUSABLE = tuple(
    IPv4Network(n) for n in ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4")
)
# A pool this large is a typo, not a routed block (and would make a /32 per address unthinkable).
MIN_POOL_PREFIX = 8
# Below this the network is not a management network but "everything".
MIN_PROTECTED_PREFIX = 8


def parse_network(value: str, field: str, min_prefix: int) -> IPv4Network:
    """An IPv4 network in CIDR notation without host bits (``203.0.113.0/24``), naming ``field``."""
    text = value.strip() if isinstance(value, str) else ""
    if "/" not in text:
        raise InvalidInput(field, f"{value!r} is not a network in CIDR notation (e.g. 203.0.113.0/24)")
    try:
        net = IPv4Network(text, strict=True)
    except ValueError as exc:  # AddressValueError, NetmaskValueError, "has host bits set"
        kind = "not an IPv4 network" if isinstance(exc, AddressValueError | NetmaskValueError) else str(exc)
        raise InvalidInput(field, f"{value!r}: {kind}") from None
    if net.prefixlen < min_prefix:
        raise InvalidInput(field, f"{net} is larger than a /{min_prefix}")
    return net


def check_pool_range(net: IPv4Network, field: str) -> None:
    for bad in UNUSABLE:
        if net.overlaps(bad):
            raise InvalidInput(field, f"{net} overlaps {bad}, which is not public unicast space")


def pool_view(state: DesiredState, pool: IPv4Network) -> PoolOut:
    used = {ip for ip in state.public_ips() if ip in pool}
    return PoolOut(pool=str(pool), size=pool.num_addresses, used=len(used))


def plan_pool_add(state: DesiredState, value: str) -> tuple[NetworkConfig, IPv4Network]:
    """The config with pool ``value`` added. 422 malformed / host bits / not public unicast;
    409 overlapping a pool or a protected network, or holding the gateway or a host's underlay address."""
    config = state.config
    net = parse_network(value, "pool", MIN_POOL_PREFIX)
    check_pool_range(net, "pool")
    for pool in config.public_pools:
        if net.overlaps(pool):
            raise Conflict("pool", f"{net} overlaps the public pool {pool}")
    for protected in config.protected_networks:
        if net.overlaps(protected):
            raise Conflict("pool", f"{net} overlaps the protected network {protected}")
    if config.gateway_ip in net:
        raise Conflict("pool", f"{net} holds the gateway address {config.gateway_ip}")
    for host in sorted(state.hosts.values(), key=lambda h: h.name):
        if host.underlay_ip is not None and host.underlay_ip in net:
            raise Conflict("pool", f"{net} holds host {host.name!r}'s underlay address {host.underlay_ip}")
    pools = tuple(sorted((*config.public_pools, net)))
    return dataclasses.replace(config, public_pools=pools), net


def plan_pool_remove(state: DesiredState, address: str, prefix: int) -> tuple[NetworkConfig, IPv4Network]:
    """The config without the pool ``address/prefix``. 404 if it is not a pool (one with host bits
    never is); 409 while a container holds an IP of it (named: its mappings and flows would point nowhere)."""
    ip = parse_ip(address, "address")
    try:
        net = IPv4Network(f"{ip}/{prefix}", strict=False)
    except ValueError:
        raise InvalidInput("prefix", f"{prefix} is not a prefix length (0-32)") from None
    if str(net.network_address) != address:
        raise NotFound("pool", f"{address}/{prefix} is not a public pool (it has host bits set; pools have none)")
    config = state.config
    if net not in config.public_pools:
        raise NotFound("pool", f"{net} is not a public pool")
    holders = sorted(c.name for c in state.containers.values() if any(ip in net for ip in c.ips))
    if holders:
        more = f" and {len(holders) - 3} more" if len(holders) > 3 else ""
        raise Conflict("pool", f"{net} is in use: container {', '.join(map(repr, holders[:3]))}{more} holds an IP of it")
    return dataclasses.replace(config, public_pools=tuple(p for p in config.public_pools if p != net)), net


def plan_config(state: DesiredState, patch: ConfigPatch) -> NetworkConfig:
    """The config with ``patch`` applied. Ranges were checked by the schema (422); here: the gateway
    address (link-local unicast, outside pools and protected networks), the block size (a power of
    two), the protected networks (CIDRs, outside the pools), and, while containers exist, 409 for
    any changed field: containers, switches and tunnels are plumbed with the old values."""
    old = state.config
    changes: dict[str, object] = {}
    if patch.gateway_ip is not None:
        gw = parse_ip(patch.gateway_ip, "gateway_ip")
        if not gw.is_link_local:  # the host owns it as a /32, so any address of 169.254.0.0/16 will do
            raise InvalidInput("gateway_ip", f"{gw} is not a link-local address (169.254.0.0/16)")
        changes["gateway_ip"] = gw
    if patch.block_size is not None:
        size = patch.block_size
        if size & (size - 1):
            raise InvalidInput("block_size", f"{size} is not a power of two")
        changes["block_size"] = size
    if patch.container_mtu is not None:
        changes["container_mtu"] = patch.container_mtu
    if patch.protected_networks is not None:
        nets = []
        for i, value in enumerate(patch.protected_networks):
            field = f"protected_networks[{i}]"
            net = parse_network(value, field, MIN_PROTECTED_PREFIX)
            for pool in old.public_pools:
                if net.overlaps(pool):
                    raise Conflict(field, f"{net} overlaps the public pool {pool}")
            nets.append(net)
        changes["protected_networks"] = tuple(dict.fromkeys(nets))
    if patch.vxlan_vni is not None:
        changes["vxlan_vni"] = patch.vxlan_vni
    if patch.vxlan_port is not None:
        changes["vxlan_port"] = patch.vxlan_port
    changed = [name for name, value in changes.items() if getattr(old, name) != value]
    if changed and state.containers:
        raise Conflict(
            changed[0],
            f"cannot change {', '.join(changed)} while {len(state.containers)} container(s) exist: "
            "they are plumbed with the old value; remove them first",
        )
    return dataclasses.replace(old, **changes)  # type: ignore[arg-type]
