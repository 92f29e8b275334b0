"""Checks that turn user input into model values, or say which field is wrong and why.

Every check raises :class:`InvalidInput` (malformed) or :class:`Conflict`
(well-formed but clashing with the current state) carrying the field name, so
the API can answer 422/409 with a body naming it and the CLI can print it. The
functions are pure: they read a :class:`DesiredState` and never change it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping as Weights
from collections.abc import Sequence
from dataclasses import replace
from ipaddress import AddressValueError, IPv4Address, IPv4Network

from portmesh.model.blocks import allocate_block
from portmesh.model.config import NetworkConfig
from portmesh.model.entities import (
    DEFAULT_STOP_TIMEOUT,
    Backend,
    Container,
    DesiredState,
    HealthCheck,
    HealthKind,
    Mapping,
    MappingKey,
    Proto,
    RestartPolicy,
    mac_for,
)
from portmesh.model.errors import Conflict, InvalidInput, NotFound

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


def parse_name(value: str, field: str = "name") -> str:
    """A container or host name: lowercase letters, digits, ``_.-``, 1-63 chars."""
    if not NAME_RE.fullmatch(value):  # fullmatch: "$" alone would let "web\n" through
        rule = "a lowercase letter or digit, then lowercase letters, digits, '_', '.', '-'; 1-63 chars"
        raise InvalidInput(field, f"{value!r} is not a valid name ({rule})")
    return value


def parse_ip(value: str, field: str = "ip") -> IPv4Address:
    """An IPv4 address in dotted form."""
    try:
        return IPv4Address(value)
    except (AddressValueError, ValueError):
        raise InvalidInput(field, f"{value!r} is not an IPv4 address") from None


def parse_port(value: int | str, field: str = "port") -> int:
    """A TCP/UDP port number, 1-65535."""
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise InvalidInput(field, f"{value!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise InvalidInput(field, f"{port} is outside 1-65535")
    return port


def parse_proto(value: str, field: str = "proto") -> Proto:
    """``tcp`` or ``udp`` (case-insensitive)."""
    try:
        return Proto(value.lower())
    except ValueError:
        raise InvalidInput(field, f"{value!r} is not a protocol (tcp or udp)") from None


def parse_port_spec(value: str, field: str = "port") -> tuple[int, Proto]:
    """``80/tcp``, ``53/udp`` or a bare ``80`` (TCP), as docker's ``-p`` reads it."""
    port, _, proto = value.partition("/")
    return parse_port(port, field), parse_proto(proto or "tcp", field)


# Docker's image reference grammar (github.com/distribution/reference, regexp.go): optional
# registry host[:port], lowercase path components joined by "/", optional ":tag", optional "@digest".
_ALNUM = r"[a-z0-9]+"
_COMPONENT = rf"{_ALNUM}(?:(?:[._]|__|-+){_ALNUM})*"
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"  # Go's \w: ASCII only
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE_RE = re.compile(rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::{_TAG})?(?:@{_DIGEST})?")


def parse_image(value: str, field: str = "image") -> str:
    """A well-formed image reference (``busybox``, ``portmesh/busybox:latest``, ``reg:5000/a/b@sha256:...``).

    Refused up front (422) rather than by the host's engine after the container was written:
    an engine refusal only shows as the container's error, after the fact. Whether a
    well-formed reference exists is only known to the engine (see the API's rollback).
    """
    if not IMAGE_RE.fullmatch(value):
        raise InvalidInput(field, f"{value!r} is not a valid image reference (e.g. 'busybox', 'portmesh/busybox:latest')")
    return value


def choose_host(state: DesiredState) -> str:
    """The host a container without one goes to: the one with the fewest containers, ties by name.

    Stated and deterministic, so the answer can say why (and a user can predict it); with one
    host it is that host.
    """
    if not state.hosts:
        raise NotFound("host", "no host is registered; add one first")
    count = dict.fromkeys(state.hosts, 0)
    for c in state.containers.values():
        if c.host in count:
            count[c.host] += 1
    return min(count, key=lambda h: (count[h], h))


def check_public_ip(ip: IPv4Address, config: NetworkConfig, field: str = "ip") -> None:
    """The IP must come from a configured public pool (409 otherwise: it is well-formed)."""
    if not config.in_pools(ip):
        pools = ", ".join(str(p) for p in config.public_pools)
        raise Conflict(field, f"{ip} is not in the public pools ({pools})")


def new_container(
    state: DesiredState,
    config: NetworkConfig,
    *,
    name: str,
    host: str,
    ips: list[IPv4Address],
    command: tuple[str, ...] = (),
    image: str | None = None,
    env: tuple[str, ...] = (),
    restart: RestartPolicy = RestartPolicy.NO,
    stop_timeout: int = DEFAULT_STOP_TIMEOUT,
) -> Container:
    """Build a container for ``state``: checks names and IPs, derives the MAC, allocates its block."""
    parse_name(name, "name")
    if name in state.containers:
        raise Conflict("name", f"container {name!r} already exists")
    if host not in state.hosts:
        raise NotFound("host", f"host {host!r} does not exist")
    if not ips:
        raise InvalidInput("ips", "a container needs at least one public IP")
    if len(set(ips)) != len(ips):
        raise InvalidInput("ips", "the same IP is listed twice")
    for ip in ips:
        check_public_ip(ip, config, "ips")
    mac = mac_for(name)
    if any(c.mac == mac for c in state.containers.values()):
        raise Conflict("name", f"derived MAC {mac} collides with another container; pick another name")
    block = allocate_block(state, config, ips)
    return Container(
        name=name,
        host=host,
        mac=mac,
        ips=tuple(sorted(ips)),
        block=block,
        command=command,
        image=image,
        env=parse_env(env),
        restart=restart,
        stop_timeout=parse_stop_timeout(stop_timeout),
    )


MAX_BACKENDS = 64
MAX_WEIGHT = 100
MAX_POLICY_NETWORKS = 256


def _check_backend(state: DesiredState, key: MappingKey, container: str, field: str) -> None:
    """May ``container`` take connections for ``key``? It must exist and hold the public IP, and the
    port must lie in no ephemeral block on that IP, its own included (the block flow would shadow it)."""
    owner = state.containers.get(container)
    if owner is None:
        raise NotFound(field, f"container {container!r} does not exist")
    if key.public_ip not in owner.ips:
        # One container: the public IP is what does not fit it (the field users fix); several: name the backend.
        raise Conflict("public_ip" if field == "container" else field, f"container {container!r} does not hold {key.public_ip}")
    for other in state.containers.values():
        if key.public_ip in other.ips and key.port in other.block:
            whose = "the container's own" if other.name == container else f"{other.name!r}'s"
            raise Conflict("port", f"{key.port} lies in {whose} ephemeral block {other.block} on {key.public_ip}")


def parse_weight(value: int, field: str = "weight") -> int:
    """A backend's relative share of new connections: a whole number in 1-MAX_WEIGHT."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WEIGHT:
        raise InvalidInput(field, f"{value!r} is not a whole number in 1-{MAX_WEIGHT}")
    return value


def parse_networks(values: Sequence[str], field: str) -> tuple[IPv4Network, ...]:
    """Source networks of a policy: ``A.B.C.D/LEN`` (or an address alone, a /32), without host bits
    (``198.51.100.1/25`` is refused rather than read as a /25 someone did not mean). Sorted, unique."""
    if isinstance(values, str):
        raise InvalidInput(field, "a list of networks is expected, not one string")
    if len(values) > MAX_POLICY_NETWORKS:
        raise InvalidInput(field, f"{len(values)} networks; at most {MAX_POLICY_NETWORKS}")
    out: set[IPv4Network] = set()
    for i, value in enumerate(values):
        if not isinstance(value, str) or not re.fullmatch(r"[0-9./]{7,18}", value):
            raise InvalidInput(f"{field}[{i}]", f"{value!r} is not an IPv4 network (A.B.C.D/LEN)")
        try:
            out.add(IPv4Network(value, strict=True))
        except ValueError as exc:  # AddressValueError, NetmaskValueError, host bits set
            raise InvalidInput(f"{field}[{i}]", f"{value!r} is not an IPv4 network: {exc}") from None
    return tuple(sorted(out))


PATH_RE = re.compile(r"/[!-~]{0,255}")


def parse_health(
    kind: str,
    port: int = 0,
    path: str = "/",
    expect: int = 200,
    interval: float = 2.0,
    timeout: float = 1.0,
    threshold: int = 2,
    field: str = "health",
) -> HealthCheck:
    """A health check from user input; each bad part names ``health.<part>``."""
    try:
        how = HealthKind(kind)
    except ValueError:
        raise InvalidInput(f"{field}.kind", f"{kind!r} is not a health check kind (tcp, http)") from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidInput(f"{field}.port", f"{port!r} is not a port (1-65535, or 0 for the mapping's own)")
    if not isinstance(path, str) or not PATH_RE.fullmatch(path):
        raise InvalidInput(f"{field}.path", f"{path!r} is not an HTTP path (starts with '/', printable ASCII, no spaces)")
    if isinstance(expect, bool) or not isinstance(expect, int) or not 100 <= expect <= 599:
        raise InvalidInput(f"{field}.expect", f"{expect!r} is not an HTTP status (100-599)")
    for name, value, low, high in (("interval", interval, 0.2, 3600.0), ("timeout", timeout, 0.05, 60.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise InvalidInput(f"{field}.{name}", f"{value!r} is not a number of seconds in {low:g}-{high:g}")
    if timeout > interval:
        raise InvalidInput(f"{field}.timeout", f"{timeout:g} s is longer than the interval ({interval:g} s)")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= 10:
        raise InvalidInput(f"{field}.threshold", f"{threshold!r} is not a whole number in 1-10")
    return HealthCheck(how, port, path, expect, float(interval), float(timeout), threshold)


def new_mapping(
    state: DesiredState,
    key: MappingKey,
    container: str | Sequence[str],
    weights: Weights[str, int] | None = None,
    allow: tuple[IPv4Network, ...] = (),
    deny: tuple[IPv4Network, ...] = (),
    health: HealthCheck | None = None,
) -> Mapping:
    """Check that ``key`` may be mapped to ``container`` (one name, or several: a load-balanced
    mapping) and build the mapping.

    Refused: an unknown container (404); an IP a backend does not hold (409: the packet would
    reach a container that drops it); a key already mapped (409, even to the same container:
    mappings are never taken over; backends are added with :func:`with_backend`); a port inside
    any container's ephemeral block on that IP (409: the block flow would be shadowed, and replies
    would go astray); a backend named twice, or a weight for a container that is not a backend (422).
    """
    names = [container] if isinstance(container, str) else list(container)
    field = "container" if isinstance(container, str) else "backends"
    if not names:
        raise InvalidInput(field, "a mapping needs at least one backend container")
    if len(names) > MAX_BACKENDS:
        raise InvalidInput(field, f"{len(names)} backends; at most {MAX_BACKENDS}")
    seen: set[str] = set()
    for i, name in enumerate(names):
        where = field if isinstance(container, str) else f"{field}[{i}]"
        if name in seen:
            raise InvalidInput(where, f"{name!r} is named twice")
        seen.add(name)
        _check_backend(state, key, name, where)
    weights = dict(weights or {})
    for name, weight in weights.items():
        if name not in seen:
            raise InvalidInput(f"weights.{name}", f"{name!r} is not one of the mapping's backends")
        parse_weight(weight, f"weights.{name}")
    existing = state.mappings.get(key)
    if existing is not None:
        raise Conflict("port", f"{key} is already mapped to {existing.container!r}")
    backends = tuple(Backend(n, weights.get(n, 1)) for n in names)
    return Mapping(key=key, container=names[0], backends=backends, allow=allow, deny=deny, health=health)


def with_backend(state: DesiredState, mapping: Mapping, container: str, weight: int = 1) -> Mapping:
    """``mapping`` with one more backend (409 if it is one already; the checks of :func:`new_mapping`)."""
    if container in mapping.names:
        raise Conflict("container", f"{container!r} is already a backend of {mapping.key}")
    if len(mapping.backends) >= MAX_BACKENDS:
        raise Conflict("container", f"{mapping.key} has {MAX_BACKENDS} backends already")
    _check_backend(state, mapping.key, container, "container")
    parse_weight(weight)
    return replace(mapping, backends=(*mapping.backends, Backend(container, weight)))


def without_backend(mapping: Mapping, container: str) -> Mapping:
    """``mapping`` without one backend (404 if it is not one; 409 for the last: remove the mapping)."""
    if container not in mapping.names:
        raise NotFound("container", f"{container!r} is not a backend of {mapping.key}")
    if len(mapping.backends) == 1:
        raise Conflict("container", f"{container!r} is the last backend of {mapping.key}: remove the mapping instead")
    backends = tuple(b for b in mapping.backends if b.container != container)
    return replace(mapping, container=backends[0].container, backends=backends, down=mapping.down - {container})


ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_STOP_TIMEOUT = 3600


def parse_env(values: list[str] | tuple[str, ...], field: str = "env") -> tuple[str, ...]:
    """``KEY=VALUE`` strings (``-e`` as Docker reads them, the value may be empty); the key an identifier."""
    out = []
    for i, item in enumerate(values):
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidInput(f"{field}[{i}]", f"{item!r} is not KEY=VALUE")
        if not ENV_KEY_RE.fullmatch(key):
            raise InvalidInput(f"{field}[{i}]", f"{key!r} is not a valid variable name (letters, digits, '_'; not a digit first)")
        if "\0" in value:
            raise InvalidInput(f"{field}[{i}]", "the value holds a NUL character")
        try:
            value.encode()
        except UnicodeEncodeError:  # a lone surrogate from JSON's \uD800-\uDFFF: no process can be given it
            raise InvalidInput(f"{field}[{i}]", "the value is not valid Unicode text") from None
        out.append(item)
    return tuple(out)


def parse_restart(value: str, field: str = "restart") -> RestartPolicy:
    """``no``, ``on-failure`` or ``always`` (Docker's restart policies)."""
    try:
        return RestartPolicy(value)
    except ValueError:
        choices = ", ".join(p.value for p in RestartPolicy)
        raise InvalidInput(field, f"{value!r} is not a restart policy ({choices})") from None


def parse_stop_timeout(value: int, field: str = "stop_timeout") -> int:
    """Seconds between SIGTERM and SIGKILL on stop: 0 (kill at once) to an hour."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_STOP_TIMEOUT:
        raise InvalidInput(field, f"{value!r} is not a whole number of seconds in 0-{MAX_STOP_TIMEOUT}")
    return value
