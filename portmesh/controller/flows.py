"""A flow as a plain value: what the compiler produces and the encoder turns into bytes.

A :class:`Flow` is hashable and carries its own cookie. The cookie's top 32 bits
name the owner (a mapping, a container, a host), the low 32 bits are a digest of
the flow's content; two flows with the same cookie are the same flow, so the
controller diffs a switch's installed flows against the desired ones by cookie
alone and never needs to compare matches or actions read back from the switch.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field

from portmesh.controller.pipeline import Table

OFPP_IN_PORT = 0xFFFFFFF8
OFPP_LOCAL = 0xFFFFFFFE
OFPP_CONTROLLER = 0xFFFFFFFD

MatchValue = int | str | tuple[int | str, int | str]


class OwnerKind(enum.IntEnum):
    """Who a flow belongs to; the top nibble of its cookie."""

    HOST = 1
    CONTAINER = 2
    MAPPING = 3
    REJECT = 4


@dataclass(frozen=True, slots=True)
class SetField:
    """OpenFlow set-field (OXM name and value)."""

    field: str
    value: int | str


@dataclass(frozen=True, slots=True)
class Move:
    """Nicira reg-move: copy ``n_bits`` from field ``src`` to ``dst`` (OF1.3 has no copy-field)."""

    src: str
    dst: str
    n_bits: int


@dataclass(frozen=True, slots=True)
class Output:
    """Send out of a port number (or OFPP_IN_PORT / OFPP_LOCAL)."""

    port: int


@dataclass(frozen=True, slots=True)
class ToController:
    """Punt to the controller, keeping the first ``max_len`` bytes."""

    max_len: int = 128


Action = SetField | Move | Output | ToController


def owner_id(kind: OwnerKind, name: str) -> int:
    """The 32-bit owner part of a cookie: kind in the top nibble, a digest of the name below."""
    digest = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "big")
    return (int(kind) << 28) | (digest & 0x0FFFFFFF)


# Every flow shape seen, checked against the pipeline declaration once, and shared by its flows;
# with it, a stable tag (its repr) that the cookie digest covers, so per flow only values are hashed.
_SHAPES: dict[tuple[object, ...], tuple[tuple[object, ...], bytes]] = {}


@dataclass(frozen=True, slots=True)
class Flow:
    """One flow entry. ``match`` is a sorted tuple of ``(field, value)`` or ``(field, (value, mask))``."""

    table: Table
    priority: int
    match: tuple[tuple[str, MatchValue], ...]
    actions: tuple[Action, ...] = ()
    goto: Table | None = None
    owner_kind: OwnerKind = OwnerKind.HOST
    owner: str = ""
    cookie: int = field(default=0, compare=False)
    shape: tuple[object, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        # Everything but the values: the pipeline check is done once per shape, and the encoder
        # keeps one template per shape.
        shape = (
            self.table,
            self.priority,
            tuple((name, isinstance(value, tuple)) for name, value in self.match),
            tuple(a if isinstance(a, Move | ToController) else (type(a), getattr(a, "field", None)) for a in self.actions),
            self.goto,
        )
        known = _SHAPES.get(shape)
        if known is None:
            self.table.check(dict(self.match), self.goto)
            known = _SHAPES[shape] = (shape, repr(shape).encode())
        object.__setattr__(self, "shape", known[0])
        values = (
            tuple(value for _, value in self.match),
            tuple(a.value if isinstance(a, SetField) else a.port if isinstance(a, Output) else None for a in self.actions),
        )
        digest = int.from_bytes(hashlib.blake2b(known[1] + repr(values).encode(), digest_size=4).digest(), "big")
        object.__setattr__(self, "cookie", (owner_id(self.owner_kind, self.owner) << 32) | digest)


def flow(
    table: Table,
    priority: int,
    owner_kind: OwnerKind,
    owner: str,
    actions: tuple[Action, ...] = (),
    goto: Table | None = None,
    /,
    **match: MatchValue,
) -> Flow:
    """Convenience constructor: match fields as keyword arguments, sorted into the canonical tuple."""
    return Flow(
        table=table,
        priority=priority,
        match=tuple(sorted(match.items())),
        actions=actions,
        goto=goto,
        owner_kind=owner_kind,
        owner=owner,
    )
