"""Conversion between OVSDB rows of the Portmesh schema and model values.

Kept apart from the client so the wire layout (column names, JSON-in-a-string
for ``command``, optional columns as 0/1-element lists) is described in one
place, and the client only deals with transactions and threads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from collections.abc import Mapping as MappingABC
from dataclasses import replace
from importlib import resources
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from portmesh.model.blocks import BlockTaken
from portmesh.model.config import NetworkConfig
from portmesh.model.entities import (
    DEFAULT_STOP_TIMEOUT,
    Backend,
    Container,
    ContainerStatus,
    HealthCheck,
    HealthKind,
    Host,
    HostRole,
    HostStatus,
    Mapping,
    MappingCounters,
    MappingKey,
    PortBlock,
    Proto,
    RestartPolicy,
    RunState,
)
from portmesh.model.errors import Conflict, InvalidInput, ModelError

SCHEMA_NAME = "Portmesh"

# OVSDB integers are signed 64-bit; a datapath id above this cannot be stored.
MAX_DATAPATH_ID = 2**63 - 1

# An OVS IDL row: attributes are the schema's columns. The library is untyped.
Row = Any


# The columns the desired state is made of (what host_from_row, container_from_row and
# mapping_from_row read): a reader that monitors only these never hears of status reports.
# The cloud's configuration (schema 1.4.0), in the Global row: what config_from_row reads.
CONFIG_COLUMNS: tuple[str, ...] = (
    "public_pools",
    "gateway_ip",
    "block_size",
    "container_mtu",
    "protected_networks",
    "vxlan_vni",
    "vxlan_port",
)

DESIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "Global": ("generation", *CONFIG_COLUMNS),
    # ``uplink`` (schema 1.7.0) is the agent's report, but the switch of a gateway host is compiled for it.
    "Host": ("name", "datapath_id", "underlay_ip", "role", "uplink"),
    "Container": (
        "name",
        "host",
        "mac",
        "ips",
        "block_start",
        "block_size",
        "command",
        "image",
        "env",
        "restart",
        "stop_timeout",
        "starts",
    ),
    # Schema 1.6.0 (issue 15): the backends with their weights, the firewall policy, the health check,
    # and ``backend_health``: written by agents, but what :attr:`Mapping.down` is made of, which the
    # switches act on, so the controller's reader monitors it with the desired columns.
    "Mapping": ("public_ip", "proto", "port", "container", "backends", "allow", "deny", "health", "backend_health"),
}

# The fields of a HealthCheck as keys of the ``health`` column, and of MappingCounters in ``counters``.
HEALTH_FIELDS = ("kind", "port", "path", "expect", "interval", "timeout", "threshold")
COUNTER_FIELDS = ("allowed_packets", "allowed_bytes", "denied_packets", "denied_bytes")
# The Mapping columns that make a mapping more than plain (backend_health counts only with a health check).
MAPPING_POLICY = ("backends", "allow", "deny", "health")
# The Mapping columns a change of a mapping writes (Store.update_mapping verifies them).
MAPPING_WRITTEN = ("container", "backends", "allow", "deny", "health")
# A backend_health value: "up", or "down: <reason>" (anything starting with "down" counts as down).
UP, DOWN = "up", "down"


def schema_path() -> Path:
    """Filesystem path of the bundled ``portmesh.ovsschema`` (ovsdb-tool needs a file)."""
    return Path(str(resources.files("portmesh.store").joinpath("portmesh.ovsschema")))


def _optional(value: list[Any]) -> Any:
    """An optional (min 0, max 1) column reads as a 0- or 1-element list."""
    return value[0] if value else None


def host_from_row(row: Row) -> Host:
    """The desired part of a Host row (an empty ``role``, as a row from before schema 1.4.0 has: gateway;
    no ``uplink``, as before schema 1.7.0: the host routes inbound traffic through its bridge's internal port)."""
    ip = _optional(row.underlay_ip)
    role = _optional(getattr(row, "role", []))
    uplink = _optional(getattr(row, "uplink", []))
    return Host(
        name=row.name,
        datapath_id=row.datapath_id,
        underlay_ip=IPv4Address(ip) if ip else None,
        role=HostRole(role) if role else HostRole.GATEWAY,
        uplink=str(uplink) if uplink else None,
    )


def config_from_row(row: Row) -> NetworkConfig:
    """The cloud's configuration held by the Global row.

    The sets are taken as they are: an empty ``public_pools`` means no pools, not the default
    (a new or upgraded database is written the whole default config explicitly, see
    :func:`config_columns`). A scalar column left empty keeps the model's default for that
    field, which only a Global row written by something else than portmesh can have.
    """
    present: dict[str, object] = {
        "public_pools": tuple(sorted((IPv4Network(n) for n in row.public_pools), key=_net_key)),
        "protected_networks": tuple(sorted((IPv4Network(n) for n in row.protected_networks), key=_net_key)),
    }
    ip = _optional(row.gateway_ip)
    if ip:
        present["gateway_ip"] = IPv4Address(ip)
    for name in ("block_size", "container_mtu", "vxlan_vni", "vxlan_port"):
        value = _optional(getattr(row, name))
        if value is not None:
            present[name] = int(value)
    return replace(NetworkConfig(), **present)  # type: ignore[arg-type]


def _net_key(net: IPv4Network) -> tuple[int, int]:
    return int(net.network_address), net.prefixlen


def config_columns(config: NetworkConfig) -> dict[str, object]:
    """The Global row's config columns for ``config``, as Python values (what the IDL takes)."""
    return {
        "public_pools": sorted(str(n) for n in config.public_pools),
        "gateway_ip": [str(config.gateway_ip)],
        "block_size": [config.block_size],
        "container_mtu": [config.container_mtu],
        "protected_networks": sorted(str(n) for n in config.protected_networks),
        "vxlan_vni": [config.vxlan_vni],
        "vxlan_port": [config.vxlan_port],
    }


def config_json(config: NetworkConfig) -> dict[str, object]:
    """The same columns in OVSDB's JSON (RFC 7047 §5.1), for raw ``insert``/``update`` operations."""
    return {name: ["set", value] for name, value in config_columns(config).items()}


def fill_config(row: Row, config: NetworkConfig) -> None:
    """Write ``config`` into the Global row."""
    for name, value in config_columns(config).items():
        setattr(row, name, value)


def host_status_from_row(row: Row) -> HostStatus:
    """The status part of a Host row (written by the controller and the agent)."""
    return HostStatus(
        switch_generation=row.switch_generation,
        agent_generation=row.agent_generation,
        switch_connected=row.switch_connected,
        switch_waiting=frozenset(getattr(row, "switch_waiting", ())),  # absent before schema 1.2.0
        tunnels=tunnels_from_row(row),
        heartbeat=int(getattr(row, "heartbeat", 0) or 0),  # absent before schema 1.9.0, or not replicated
        datapath=datapath_from_row(row),
    )


def datapath_from_row(row: Row) -> str | None:
    """What the host's agent said its datapath is (schema 1.9.0): ``ovs`` or ``ebpf``; None if it never
    said (an agent from before 1.9.0, or one not started yet)."""
    value = _optional(getattr(row, "datapath", None) or [])
    return str(value) if value else None


def tunnels_from_row(row: Row) -> tuple[tuple[str, str], ...]:
    """The agent's tunnel report as :attr:`HostStatus.tunnels`: (peer, state) pairs by peer."""
    tunnels: MappingABC[str, str] = getattr(row, "tunnels", None) or {}  # absent before schema 1.4.0
    return tuple(sorted((str(peer), str(state)) for peer, state in tunnels.items()))


def container_from_row(row: Row) -> Container:
    """The desired part of a Container row.

    ``ips`` is an OVSDB set, which has no order: the IPs come back sorted.
    """
    ips = tuple(sorted(IPv4Address(ip) for ip in row.ips))
    command = json.loads(row.command) if row.command else []
    env = getattr(row, "env", "")  # the four columns below are absent before schema 1.2.0
    timeout = _optional(getattr(row, "stop_timeout", []))
    return Container(
        name=row.name,
        host=row.host,
        mac=row.mac,
        ips=ips,
        block=PortBlock(start=row.block_start, size=row.block_size),
        command=tuple(str(part) for part in command),
        image=_optional(row.image),
        env=tuple(str(item) for item in json.loads(env)) if env else (),
        restart=RestartPolicy(_optional(getattr(row, "restart", [])) or RestartPolicy.NO),
        stop_timeout=DEFAULT_STOP_TIMEOUT if timeout is None else int(timeout),
        starts=int(getattr(row, "starts", 0)),
    )


def container_status_from_row(row: Row) -> ContainerStatus | None:
    """The status part of a Container row; None if the agent has not reported on it yet."""
    state = _optional(row.state)
    if state is None:
        return None
    return ContainerStatus(
        state=RunState(state),
        netns=row.netns,
        pid=_optional(row.pid),
        message=row.message,
        log_path=getattr(row, "log_path", ""),  # absent from a database made with schema 1.0.0
        exit_code=_optional(getattr(row, "exit_code", [])),  # these three: absent before schema 1.2.0
        restarts=getattr(row, "restart_count", 0),
        runtime=getattr(row, "runtime", ""),
    )


def mapping_from_row(row: Row) -> Mapping:
    """A Mapping row as a model mapping.

    Most mappings are plain (one backend of weight 1, no policy, no check): their policy columns
    are empty and the mapping is built as before schema 1.6.0, which keeps a 100,000-mapping
    load as cheap as it was. ``backends`` holds every backend, ``container`` first; an empty map
    (a plain mapping, or a row from before 1.6.0) is ``container`` alone with weight 1. The map has
    no order: the backends after the first come back sorted by name. ``backend_health`` counts
    only while the mapping has a health check (a late report after the check was removed is moot).
    """
    key = MappingKey(public_ip=IPv4Address(row.public_ip), proto=Proto(row.proto), port=row.port)
    container = row.container
    weights = getattr(row, "backends", None)  # these columns: absent before schema 1.6.0
    allow = getattr(row, "allow", None)
    deny = getattr(row, "deny", None)
    health = getattr(row, "health", None)
    if not (weights or allow or deny or health):
        return Mapping(key=key, container=container)
    check = health_from_column(health) if health else None
    backends = backends_from_column(container, weights or {})
    down: frozenset[str] = frozenset()
    if check is not None:
        names = {b.container for b in backends}
        reports: MappingABC[str, str] = getattr(row, "backend_health", None) or {}
        down = frozenset(n for n, state in reports.items() if n in names and str(state).startswith(DOWN))
    return Mapping(
        key=key,
        container=container,
        backends=backends,
        allow=networks_from_column(allow or ()),
        deny=networks_from_column(deny or ()),
        health=check,
        down=down,
    )


def plain_mapping(public_ip: str, proto: str, port: int, container: str) -> Mapping:
    """A mapping without any schema 1.6.0 column set: one backend of weight 1, no policy, no check."""
    return Mapping(key=MappingKey(public_ip=IPv4Address(public_ip), proto=Proto(proto), port=port), container=container)


def backends_from_column(container: str, weights: MappingABC[str, int]) -> tuple[Backend, ...]:
    """``container`` first (weight 1 if the map lacks it), then the others by name."""
    first = Backend(container, int(weights.get(container, 1)))
    return (first, *(Backend(str(n), int(w)) for n, w in sorted(weights.items()) if n != container))


def backends_column(m: Mapping) -> dict[str, int]:
    """The ``backends`` map: empty for a plain mapping (one backend of weight 1), every backend otherwise."""
    if len(m.backends) == 1 and m.backends[0].weight == 1:
        return {}
    return {b.container: b.weight for b in m.backends}


def networks_from_column(values: Collection[str]) -> tuple[IPv4Network, ...]:
    """A policy list, sorted as :func:`portmesh.model.validation.parse_networks` gives it."""
    return tuple(sorted(IPv4Network(v) for v in values))


def health_from_column(values: MappingABC[str, str]) -> HealthCheck:
    """The ``health`` map as a HealthCheck; a missing key keeps the model's default."""
    d = HealthCheck()
    return HealthCheck(
        kind=HealthKind(values.get("kind", d.kind.value)),
        port=int(values.get("port", d.port)),
        path=str(values.get("path", d.path)),
        expect=int(values.get("expect", d.expect)),
        interval=float(values.get("interval", d.interval)),
        timeout=float(values.get("timeout", d.timeout)),
        threshold=int(values.get("threshold", d.threshold)),
    )


def health_column(check: HealthCheck | None) -> dict[str, str]:
    """The ``health`` map (string values, floats in repr so they read back equal); empty without a check."""
    if check is None:
        return {}
    return {
        "kind": check.kind.value,
        "port": str(check.port),
        "path": check.path,
        "expect": str(check.expect),
        "interval": repr(float(check.interval)),
        "timeout": repr(float(check.timeout)),
        "threshold": str(check.threshold),
    }


def counters_from_column(values: MappingABC[str, int]) -> MappingCounters:
    """The ``counters`` map as MappingCounters (zero for what is missing)."""
    return MappingCounters(**{name: int(values.get(name, 0)) for name in COUNTER_FIELDS})


def counters_column(counters: MappingCounters) -> dict[str, int]:
    """The ``counters`` map."""
    return {name: int(getattr(counters, name)) for name in COUNTER_FIELDS}


def host_counters_column(counters: MappingABC[MappingKey, MappingCounters]) -> dict[str, str]:
    """An eBPF host's ``Host.counters`` (schema 1.8.0): mapping key -> its four counters, space-separated
    in COUNTER_FIELDS order (an OVSDB map's value is one atom, so the four ride in one string)."""
    return {str(key): " ".join(str(int(getattr(c, name))) for name in COUNTER_FIELDS) for key, c in counters.items()}


def host_counters_entry(value: str) -> MappingCounters:
    """One ``Host.counters`` value as MappingCounters (a malformed value counts as zero, never an error:
    a report is informative, a reader must not fail on it)."""
    try:
        numbers = [int(v) for v in str(value).split()]
    except ValueError:
        return MappingCounters()
    if len(numbers) != len(COUNTER_FIELDS) or min(numbers) < 0:
        return MappingCounters()
    return MappingCounters(*numbers)


def host_drops_from_row(row: Row) -> dict[str, int]:
    """An eBPF host's ``Host.drops`` (schema 1.8.0): drop reason -> packets (empty before 1.8.0)."""
    drops: MappingABC[str, int] = getattr(row, "drops", None) or {}
    return {str(reason): int(n) for reason, n in drops.items()}


def add_counters(a: MappingCounters, b: MappingCounters) -> MappingCounters:
    """The sum of two counts of one mapping (the switches' and a host's)."""
    return MappingCounters(*(getattr(a, n) + getattr(b, n) for n in COUNTER_FIELDS))


def counters_update(row_uuid: str, counters: MappingCounters) -> dict[str, Any]:
    """A raw ``update`` operation writing one Mapping row's counters (the controller's reader has no IDL)."""
    value = ["map", sorted(counters_column(counters).items())]
    return {"op": "update", "table": "Mapping", "where": [["_uuid", "==", ["uuid", row_uuid]]], "row": {"counters": value}}


def check_host(host: Host) -> None:
    """Refuse what the schema cannot hold, before any row is touched."""
    if not 0 <= host.datapath_id <= MAX_DATAPATH_ID:
        raise InvalidInput("datapath_id", f"{host.datapath_id} is outside 0..{MAX_DATAPATH_ID}")


def fill_host_row(row: Row, host: Host) -> None:
    """Write the operator's columns of ``host`` (status columns and the agent's ``uplink`` are left alone)."""
    check_host(host)
    row.name = host.name
    row.datapath_id = host.datapath_id
    row.underlay_ip = [str(host.underlay_ip)] if host.underlay_ip is not None else []
    row.role = [host.role.value]


def fill_container_row(row: Row, c: Container) -> None:
    """Write the desired columns of a new container (``running`` is set by the caller)."""
    row.name = c.name
    row.host = c.host
    row.mac = c.mac
    row.ips = [str(ip) for ip in c.ips]
    row.block_start = c.block.start
    row.block_size = c.block.size
    row.command = json.dumps(list(c.command))
    row.image = [c.image] if c.image is not None else []
    row.env = json.dumps(list(c.env))
    row.restart = [c.restart.value]
    row.stop_timeout = [c.stop_timeout]
    row.starts = c.starts


def fill_container_status(row: Row, status: ContainerStatus) -> None:
    """Write the status columns reported by the agent."""
    row.state = [status.state.value]
    row.netns = status.netns
    row.pid = [status.pid] if status.pid is not None else []
    row.message = status.message
    row.log_path = status.log_path
    row.exit_code = [status.exit_code] if status.exit_code is not None else []
    row.restart_count = status.restarts
    row.runtime = status.runtime


def block_claims(c: Container) -> list[tuple[str, int]]:
    """The (public IP, block start) pairs a container claims in the ``Block`` table, one per IP.

    The table's unique index on them is what keeps a block to one container per IP
    whatever number of writers: ovsdb-server refuses the second claim. It keys on the
    start only, so it assumes one ``block_size`` for the whole network (as the allocator does).
    """
    return [(str(ip), c.block.start) for ip in c.ips]


def fill_block_row(row: Row, claim: tuple[str, int], container: str) -> None:
    """Write one claim."""
    row.public_ip, row.block_start = claim
    row.container = container


def fill_mapping_row(row: Row, m: Mapping) -> None:
    """Write a new mapping: every desired column (``backend_health`` and ``counters`` are reports)."""
    row.public_ip = str(m.public_ip)
    row.proto = m.proto.value
    row.port = m.port
    fill_mapping_change(row, m, None)


def fill_mapping_change(row: Row, m: Mapping, old: Mapping | None) -> None:
    """Write the columns of ``m`` that differ from ``old`` (all of them for a new row, ``old`` None).

    Writing only what changed keeps a policy change from touching the backends' columns, and
    the columns written are the ones the caller verifies (see Store.update_mapping)."""
    if old is None or m.container != old.container:
        row.container = m.container
    if old is None or m.backends != old.backends:
        row.backends = backends_column(m)
    if old is None or m.allow != old.allow:
        row.allow = [str(n) for n in m.allow]
    if old is None or m.deny != old.deny:
        row.deny = [str(n) for n in m.deny]
    if old is None or m.health != old.health:
        row.health = health_column(m.health)


# Which caller-facing field a violated index stands for, and how to say it.
_INDEX_FIELDS: dict[tuple[str, str], tuple[str, str]] = {
    ("Host", "name"): ("name", "a host with this name already exists"),
    ("Host", "datapath_id"): ("datapath_id", "another host already has this datapath id"),
    ("Container", "name"): ("name", "a container with this name already exists"),
    ("Container", "mac"): ("mac", "another container already has this MAC"),
    ("Mapping", "public_ip"): ("port", "this (public_ip, proto, port) is already mapped"),
    ("Block", "public_ip"): ("ips", "another container claimed this port block on one of these IPs meanwhile"),
}

_INDEX_RE = re.compile(r'rows in "(?P<table>\w+)" table .* for index on columns? "(?P<column>\w+)"')
_MAX_ROWS_RE = re.compile(r'causes "(?P<table>\w+)" table to contain \d+ rows, greater than')


def _details(error: str) -> str:
    """The IDL reports a failed operation as its JSON reply; the ``details`` member says what broke."""
    try:
        reply = json.loads(error)
    except ValueError:
        return error
    return str(reply.get("details", error)) if isinstance(reply, dict) else error


def is_max_rows_violation(error: str, table: str) -> bool:
    """True if a commit failed only because a second ``table`` row was inserted concurrently."""
    match = _MAX_ROWS_RE.search(_details(error))
    return match is not None and match.group("table") == table


def error_from_commit(error: str) -> ModelError | None:
    """Turn a failed commit's error text into a model error naming the field, if it is one we know."""
    match = _INDEX_RE.search(_details(error))
    if match is None:
        return None
    field, reason = _INDEX_FIELDS.get(
        (match.group("table"), match.group("column")), (match.group("column"), "value already in use")
    )
    return BlockTaken(field, reason) if match.group("table") == "Block" else Conflict(field, reason)
