"""A flow as a plain value: what the compiler produces and the encoder turns into bytes.

A :class:`Flow` is hashable and carries its own cookie. The cookie's top 32 bits
name the owner (a mapping, a container, a host), the low 32 bits are a digest of
the flow's content; two flows with the same cookie are the same flow, so the
controller diffs a switch's installed flows against the desired ones by cookie
alone and never needs to compare matches or actions read back from the switch.

The digest covers a canonical text encoding of the flow's content, never a
Python ``repr`` or a class name, so an upgrade that renames or moves a class
does not change any cookie (which would re-install every flow on every switch).
The encoding, version ``pm1``, is ASCII::

    pm1;t=<table number>;p=<priority>;f=<field>[/m],...;a=<action> ...;g=<goto table number or ->;v=<value>,...

Fields are in the shape's (sorted) order, ``/m`` marking a masked one. Actions,
space separated, are ``set_field:<field>``, ``output`` (their values are slots
in ``v``), ``move:<src>:<dst>:<n_bits>``, ``controller:<max_len>:<meter id or ->``
and ``ct:<zone>:<table number or ->:<commit 0|1>:<label field or ->``. Values
are the match values then the variable action values, each as text: an integer
in decimal, a string as it is, a masked value as ``<value>/<mask>``.
``tests/unit/test_cookies.py`` pins the resulting cookies of a few flows.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

from portmesh.controller.pipeline import Meter, Table

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
    """Punt to the controller, keeping the first ``max_len`` bytes, through ``meter`` if one is named."""

    max_len: int = 128
    meter: Meter | None = None


@dataclass(frozen=True, slots=True)
class Ct:
    """Nicira ct: send the packet through conntrack ``zone``.

    ``commit`` records the connection, and with ``label_from`` copies that 48-bit
    field (a MAC) into the connection's ct_label. With ``table`` the tracked packet
    resumes in that table (a recirculation, declared like a goto); without it the
    packet goes on untracked.
    """

    zone: int
    table: Table | None = None
    commit: bool = False
    label_from: str | None = None


@dataclass(frozen=True, slots=True)
class Resubmit:
    """Nicira resubmit(,table): run ``table``'s matching flow's actions here and come back (a miss just
    returns). Used to look a connection up in AFFINITY before choosing a backend."""

    table: Table


@dataclass(frozen=True, slots=True)
class Multipath:
    """Nicira multipath: ``dst`` (bits 0-15) := one of ``n_links`` slots, by HRW over a symmetric L3+L4 hash."""

    n_links: int
    dst: str = "reg1"


@dataclass(frozen=True, slots=True)
class Learn:
    """Nicira learn into ``table``: a flow matching this packet's 5-tuple (``proto``: 6 or 17) that loads
    its current eth_dst into eth_dst and sets reg0 bit 0, with ``cookie`` and the given timeouts."""

    table: Table
    proto: int
    cookie: int
    idle_timeout: int
    fin_idle_timeout: int
    priority: int


Action = SetField | Move | Output | ToController | Ct | Resubmit | Multipath | Learn


def owner_id(kind: OwnerKind, name: str) -> int:
    """The 32-bit owner part of a cookie: kind in the top nibble, a digest of the name below."""
    digest = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "big")
    return (int(kind) << 28) | (digest & 0x0FFFFFFF)


# An action as the shape sees it: constant actions (Move, ToController) as themselves, variable ones
# (SetField, Output) as their class and, for SetField, the field; their values live in Flow.values.
ActionShape = tuple[type, str | None] | Move | ToController | Ct | Resubmit | Multipath | Learn


class Shape:
    """Everything about a flow but its values: table, priority, which fields, which actions, goto.

    Shapes are interned (one object per distinct shape) and checked against the
    pipeline declaration once; the encoder keeps one template per shape. A flow
    is then a shape plus a flat tuple of values, which is what makes building and
    hashing 200,000 of them cheap.
    """

    __slots__ = ("actions", "any_masked", "fields", "goto", "masked", "priority", "slot_names", "table", "tag")

    def __init__(
        self,
        table: Table,
        priority: int,
        fields: tuple[str, ...],
        masked: tuple[bool, ...],
        actions: tuple[ActionShape, ...],
        goto: Table | None,
    ) -> None:
        self.table = table
        self.priority = priority
        self.fields = fields
        self.masked = masked
        self.actions = actions
        self.goto = goto
        # Names of the value slots in order: match fields, then each variable action's field.
        self.slot_names = fields + tuple((a[1] or "output") for a in actions if isinstance(a, tuple))
        # The cookie digest covers this tag (the canonical text of everything but the values, see the
        # module docstring), so per flow only the values are formatted and hashed.
        self.tag = shape_text(table, priority, fields, masked, actions, goto).encode("ascii")
        self.any_masked = any(masked)

    def __repr__(self) -> str:
        return f"Shape({self.table.name}, {self.priority}, {self.fields}, goto={self.goto})"


def _action_text(action: ActionShape) -> str:
    """An action's stable name and constant arguments (see the module docstring)."""
    if isinstance(action, tuple):
        kind, field = action
        if kind is SetField and field is not None:
            return f"set_field:{field}"
        if kind is Output:
            return "output"
        raise TypeError(f"no canonical text for variable action {action!r}")
    if isinstance(action, Move):
        return f"move:{action.src}:{action.dst}:{action.n_bits}"
    if isinstance(action, ToController):
        meter = "-" if action.meter is None else str(action.meter.meter_id)
        return f"controller:{action.max_len}:{meter}"
    if isinstance(action, Ct):
        table = "-" if action.table is None else str(action.table.number)
        return f"ct:{action.zone}:{table}:{int(action.commit)}:{action.label_from or '-'}"
    if isinstance(action, Resubmit):
        return f"resubmit:{action.table.number}"
    if isinstance(action, Multipath):
        return f"multipath:symmetric_l3l4+udp:0:hrw:{action.n_links}:{action.dst}"
    if isinstance(action, Learn):
        return (f"learn:{action.table.number}:{action.proto}:{action.cookie}:{action.idle_timeout}:"
                f"{action.fin_idle_timeout}:{action.priority}")
    raise TypeError(f"no canonical text for action {action!r}")


def shape_text(
    table: Table,
    priority: int,
    fields: tuple[str, ...],
    masked: tuple[bool, ...],
    actions: tuple[ActionShape, ...],
    goto: Table | None,
) -> str:
    """The canonical text of a shape: the part of the cookie digest's input before ``;v=``."""
    names = ",".join(f"{name}/m" if m else name for name, m in zip(fields, masked, strict=True))
    acts = " ".join(_action_text(a) for a in actions)
    target = "-" if goto is None else str(goto.number)
    return f"pm1;t={table.number};p={int(priority)};f={names};a={acts};g={target};v="


def _value_text(value: MatchValue) -> str:
    """One value as canonical text: a masked ``(value, mask)`` as ``value/mask``; ints in decimal."""
    if isinstance(value, tuple):
        return f"{_value_text(value[0])}/{_value_text(value[1])}"
    return str(int(value)) if isinstance(value, int) else value


def values_text(shape: Shape, values: tuple[MatchValue, ...]) -> str:
    """The canonical text of a flow's values (after ``;v=``)."""
    if shape.any_masked:
        return ",".join(map(_value_text, values))
    # The hot path (200,000 mapping flows): ints and strings only, whose str() is their canonical text.
    return ",".join(map(str, values))


_SHAPES: dict[tuple[object, ...], Shape] = {}


def shape_of(
    table: Table,
    priority: int,
    fields: tuple[str, ...] = (),
    masked: tuple[bool, ...] | None = None,
    actions: tuple[ActionShape, ...] = (),
    goto: Table | None = None,
) -> Shape:
    """The interned shape; the first time a shape is seen it is checked against the pipeline."""
    masked = masked if masked is not None else (False,) * len(fields)
    key = (table, priority, fields, masked, actions, goto)
    known = _SHAPES.get(key)
    if known is None:
        if list(fields) != sorted(fields) or len(masked) != len(fields):
            raise ValueError(f"shape fields must be sorted and each marked masked or not: {fields} {masked}")
        table.check(dict.fromkeys(fields, 0), goto)
        for action in actions:
            if isinstance(action, Ct) and action.table is not None:
                table.check({}, action.table)
            if isinstance(action, Resubmit | Learn):
                table.check({}, action.table)
        known = _SHAPES[key] = Shape(table, priority, fields, masked, actions, goto)
    return known


def _action_shape(action: Action) -> ActionShape:
    if isinstance(action, SetField):
        return (SetField, action.field)
    if isinstance(action, Output):
        return (Output, None)
    return action


def _action_value(action: Action) -> int | str | None:
    if isinstance(action, SetField):
        return action.value
    if isinstance(action, Output):
        return action.port
    return None


class Flow:
    """One flow entry: a shape, its values (match values, then variable action values), its owner, its cookie.

    Match and actions are derived from shape and values on demand (the os-ken
    encoder and debugging need them; the hot path does not). Two flows are equal
    when shape, values and owner are; the cookie follows from those.
    """

    __slots__ = ("cookie", "owner", "owner_kind", "shape", "values")

    def __init__(
        self, shape: Shape, values: tuple[MatchValue, ...], owner_kind: OwnerKind, owner: str, owner_bits: int | None = None
    ) -> None:
        self.shape = shape
        self.values = values
        self.owner_kind = owner_kind
        self.owner = owner
        if owner_bits is None:
            owner_bits = owner_id(owner_kind, owner) << 32
        digest = hashlib.blake2b(shape.tag + values_text(shape, values).encode(), digest_size=4).digest()
        self.cookie = owner_bits | int.from_bytes(digest, "big")

    @property
    def table(self) -> Table:
        return self.shape.table

    @property
    def priority(self) -> int:
        return self.shape.priority

    @property
    def goto(self) -> Table | None:
        return self.shape.goto

    @property
    def match(self) -> tuple[tuple[str, MatchValue], ...]:
        """Sorted ``(field, value)`` pairs; a masked value is ``(value, mask)``."""
        return tuple(zip(self.shape.fields, self.values, strict=False))

    @property
    def actions(self) -> tuple[Action, ...]:
        values = iter(self.values[len(self.shape.fields) :])
        out: list[Action] = []
        for a in self.shape.actions:
            if isinstance(a, tuple):
                value = next(values)
                if a[0] is SetField:
                    assert a[1] is not None and not isinstance(value, tuple)
                    out.append(SetField(a[1], value))
                else:
                    assert isinstance(value, int)
                    out.append(Output(value))
            else:
                out.append(a)
        return tuple(out)

    def with_values(self, values: tuple[MatchValue, ...], cookie: int | None = None) -> Flow:
        """The same shape and owner with other values (and, if given, a forced cookie: for probing)."""
        other = Flow(self.shape, values, self.owner_kind, self.owner, self.cookie & ~0xFFFFFFFF)
        if cookie is not None:
            other.cookie = cookie
        return other

    def _key(self) -> tuple[object, ...]:
        return (self.shape, self.values, self.owner_kind, self.owner)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Flow) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"Flow({self.table.name}, prio={self.priority}, match={dict(self.match)}, actions={list(self.actions)}, "
            f"goto={self.goto.name if self.goto else None}, owner={self.owner_kind.name}:{self.owner}, "
            f"cookie={self.cookie:#018x})"
        )


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
    """Convenience constructor: match fields as keyword arguments, sorted into the canonical order.

    The compiler's hot path (one or two flows per mapping, 100,000 mappings) builds
    its shape once and calls :class:`Flow` directly instead.
    """
    items = sorted(match.items())
    shape = shape_of(
        table,
        priority,
        tuple(name for name, _ in items),
        tuple(isinstance(value, tuple) for _, value in items),
        tuple(_action_shape(a) for a in actions),
        goto,
    )
    variable = tuple(v for v in (_action_value(a) for a in actions) if v is not None)
    return Flow(shape, tuple(value for _, value in items) + variable, owner_kind, owner)
