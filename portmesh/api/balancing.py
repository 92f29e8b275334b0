"""A mapping's backends, firewall policy and health check (issue 15), from request to model value.

Pure functions over a snapshot: the model's checks judge every part and name the field, so a
refusal changes nothing. The changes to an existing mapping are handed to the store as a
function of the row it reads in its transaction (``Store.update_mapping``), so a concurrent
health report by an agent (``down``) is never overwritten with the API's older copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from ipaddress import IPv4Network

from portmesh.api.schemas import HealthIn, MappingIn, MappingPatch
from portmesh.model.entities import Backend, DesiredState, HealthCheck, Mapping, MappingKey
from portmesh.model.errors import InvalidInput
from portmesh.model.validation import (
    new_mapping,
    parse_health,
    parse_name,
    parse_networks,
    parse_weight,
    with_backend,
    without_backend,
)

Change = Callable[[Mapping], Mapping]


def health_of(body: HealthIn | None) -> HealthCheck | None:
    """The model's health check from the request's, each bad part named ``health.<part>``."""
    if body is None:
        return None
    return parse_health(body.kind, body.port, body.path, body.expect, body.interval, body.timeout, body.threshold)


def backend_names(body: MappingIn) -> str | list[str]:
    """``container`` alone (a plain mapping: refusals name ``container`` as before), or ``backends``.

    Both may be given only when ``container`` is ``backends[0]`` (the first backend is the
    mapping's container), so a request never means two different things.
    """
    if body.backends is None:
        if body.container is None:
            raise InvalidInput("container", "give the container that answers, or backends: [names]")
        return parse_name(body.container, "container")
    if body.container is not None and (not body.backends or body.backends[0] != body.container):
        raise InvalidInput("container", f"{body.container!r} is not backends[0]; give one of the two, or make them agree")
    return [parse_name(name, f"backends[{i}]") for i, name in enumerate(body.backends)]


def plan_mapping(state: DesiredState, key: MappingKey, body: MappingIn) -> tuple[Mapping, Mapping | None]:
    """The mapping ``body`` asks for, and the existing one if it is that very mapping (idempotent add).

    The same key mapped otherwise stays a 409 naming ``port``: mappings are never taken over;
    backends, policy and health of an existing mapping are changed with their own calls.
    """
    names = backend_names(body)
    allow = parse_networks(body.allow, "allow")
    deny = parse_networks(body.deny, "deny")
    health = health_of(body.health)
    existing = state.mappings.get(key)
    if existing is not None:
        # Judge the request as if the key were free, then compare: equal means already done.
        free = dataclasses.replace(state, mappings={k: m for k, m in state.mappings.items() if k != key})
        wanted = new_mapping(free, key, names, body.weights, allow, deny, health)
        if dataclasses.replace(existing, down=frozenset()) == wanted:
            return existing, existing
    return new_mapping(state, key, names, body.weights, allow, deny, health), None


def _networks(value: list[str] | None, field: str) -> tuple[IPv4Network, ...] | None:
    return None if value is None else parse_networks(value, field)


def plan_patch(mapping: Mapping, patch: MappingPatch) -> Change:
    """Check ``patch`` against ``mapping`` and return the change to apply to the row the store reads.

    ``weights`` may name only the mapping's backends (422 ``weights.<name>``). Fields absent from the
    request keep their value; ``health: null`` sent explicitly removes the check.
    """
    allow = _networks(patch.allow, "allow")
    deny = _networks(patch.deny, "deny")
    set_health = "health" in patch.model_fields_set
    health = health_of(patch.health)
    weights = dict(patch.weights or {})
    for name, weight in weights.items():
        if name not in mapping.names:
            raise InvalidInput(f"weights.{name}", f"{name!r} is not one of the backends of {mapping.key}")
        parse_weight(weight, f"weights.{name}")

    def change(current: Mapping) -> Mapping:
        backends = tuple(Backend(b.container, weights.get(b.container, b.weight)) for b in current.backends)
        return dataclasses.replace(
            current,
            backends=backends,
            allow=current.allow if allow is None else allow,
            deny=current.deny if deny is None else deny,
            health=health if set_health else current.health,
        )

    return change


def plan_backend_add(state: DesiredState, mapping: Mapping, name: str, weight: int) -> Change:
    """Add backend ``name``: 404 unknown container, 409 already a backend / IP not held / port in a block."""
    parse_name(name, "container")
    with_backend(state, mapping, name, weight)  # the checks; the change re-applies to the store's row

    def change(current: Mapping) -> Mapping:
        if name in current.names:
            return current
        return dataclasses.replace(current, backends=(*current.backends, Backend(name, weight)))

    return change


def plan_backend_remove(mapping: Mapping, name: str) -> Change:
    """Remove backend ``name``: 404 not a backend, 409 the last one (remove the mapping instead)."""
    without_backend(mapping, name)

    def change(current: Mapping) -> Mapping:
        if name not in current.names or len(current.backends) == 1:
            return current
        return without_backend(current, name)

    return change
