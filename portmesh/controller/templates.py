"""Fast encoding of many flows of few shapes: os-ken encodes one, we patch the values in.

A mapping controller installs 100,000 flows that differ only in values (an IP, a
port, a MAC, a cookie); os-ken needs ~100 µs to build and serialize each. So for
each *shape* (table, priority, which fields, which actions) os-ken encodes one
example, and one more per variable with that variable changed in every byte;
the bytes that changed are where that variable lives. Later flows of the shape
are the example's bytes with their own values written at those offsets.

os-ken stays the source of truth: a shape whose probing finds anything
unexpected (a width that does not fit the field, overlapping or moving bytes)
is never templated and keeps going through os-ken, and the tests compare
template output against os-ken's own encoding for every shape the compiler makes.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from functools import lru_cache

from portmesh.controller.flows import Flow, Shape

Slot = int | str | tuple[int | str, int | str]
Encoder = Callable[[Flow], bytes]

# Byte widths of the OXM fields and action arguments the pipeline uses.
FIELD_WIDTH = {
    "in_port": 4, "eth_type": 2, "ip_proto": 1, "tcp_src": 2, "tcp_dst": 2, "udp_src": 2, "udp_dst": 2,
    "arp_op": 2, "icmpv4_type": 1, "ipv4_src": 4, "ipv4_dst": 4, "arp_spa": 4, "arp_tpa": 4,
    "eth_src": 6, "eth_dst": 6, "arp_sha": 6, "arp_tha": 6, "output": 4, "cookie": 8, "ct_state": 4,
}


def _value_bytes(value: Slot, width: int) -> bytes:
    if isinstance(value, tuple):
        # A masked match: os-ken writes value & mask, then the mask (an IPv4 pair may be dotted text).
        v, m = (_int(x) for x in value)
        half = width // 2
        return (v & m).to_bytes(half, "big") + m.to_bytes(half, "big")
    if isinstance(value, int):
        return value.to_bytes(width, "big")
    if width == 4:
        return socket.inet_aton(value)
    return bytes.fromhex(value.replace(":", ""))


def _int(x: int | str) -> int:
    """A masked value or mask as an integer: dotted IPv4 text or a number."""
    return int.from_bytes(socket.inet_aton(x), "big") if isinstance(x, str) else x


def _flipped(value: Slot, width: int) -> Slot:
    """A value of the same kind that differs from ``value`` in every byte (masked: value and mask)."""
    if isinstance(value, tuple):
        full = (1 << (8 * (width // 2))) - 1
        v, m = (_int(x) for x in value)
        flipped = (~v & ~m & full, ~m & full)
        if isinstance(value[0], str):
            return (socket.inet_ntoa(flipped[0].to_bytes(4, "big")), socket.inet_ntoa(flipped[1].to_bytes(4, "big")))
        return flipped
    if isinstance(value, int):
        return value ^ ((1 << (8 * width)) - 1)
    raw = bytes(b ^ 0xFF for b in _value_bytes(value, width))
    if width == 4:
        return socket.inet_ntoa(raw)
    return ":".join(f"{b:02x}" for b in raw)


def slots_of(flow: Flow) -> list[tuple[str, Slot]]:
    """The flow's variable values, in a fixed order, each with the field that gives its width."""
    return [("cookie", flow.cookie), *zip(flow.shape.slot_names, flow.values, strict=True)]


def with_slot(flow: Flow, index: int, new: Slot) -> Flow:
    """``flow`` with variable number ``index`` (as :func:`slots_of` counts) replaced by ``new``; cookie kept."""
    if index == 0:
        assert isinstance(new, int)
        return flow.with_values(flow.values, cookie=new)
    values = list(flow.values)
    values[index - 1] = new
    return flow.with_values(tuple(values), cookie=flow.cookie)


@lru_cache(maxsize=1 << 16)
def _text_bytes(value: str, width: int) -> bytes:
    """IPv4 and MAC strings repeat across thousands of flows: convert each once."""
    return _value_bytes(value, width)


def _slot_bytes(value: Slot, width: int) -> bytes:
    if isinstance(value, int):
        return value.to_bytes(width, "big")
    if isinstance(value, str):
        return _text_bytes(value, width)
    return _value_bytes(value, width)


class Template:
    """One shape's example bytes and where each variable goes."""

    def __init__(self, base: bytes, offsets: list[tuple[int, int]]) -> None:
        self.base = base
        self.offsets = offsets  # (start, width) per slot, in slots_of order

    def render(self, flow: Flow) -> bytes:
        buf = bytearray(self.base)
        offsets = self.offsets
        start, width = offsets[0]
        buf[start : start + width] = flow.cookie.to_bytes(8, "big")
        for (start, width), value in zip(offsets[1:], flow.values, strict=True):
            buf[start : start + width] = _slot_bytes(value, width)
        return bytes(buf)


def probe(example: Flow, encode: Encoder) -> Template | None:
    """Find where each variable of ``example`` lives in its encoding; None if anything looks off."""
    base = encode(example)
    offsets: list[tuple[int, int]] = []
    taken: set[int] = set()
    for index, (name, value) in enumerate(slots_of(example)):
        width = FIELD_WIDTH.get(name)
        if width is None:
            return None
        if isinstance(value, tuple):
            width *= 2
        try:
            other = encode(with_slot(example, index, _flipped(value, width)))
        except (ValueError, TypeError, OverflowError, OSError):
            return None
        if len(other) != len(base):
            return None
        diff = [i for i, (a, b) in enumerate(zip(base, other, strict=True)) if a != b]
        if len(diff) != width or diff[-1] - diff[0] != width - 1 or taken & set(diff):
            return None
        taken |= set(diff)
        offsets.append((diff[0], width))
    return Template(base, offsets)


class TemplateEncoder:
    """Encodes flows through per-shape templates, falling back to ``encode`` for shapes it cannot template."""

    def __init__(self, encode: Encoder) -> None:
        self._encode = encode
        self._templates: dict[Shape, Template | None] = {}

    def __call__(self, flow: Flow) -> bytes:
        shape = flow.shape
        if shape not in self._templates:
            self._templates[shape] = probe(flow, self._encode)
        template = self._templates[shape]
        return template.render(flow) if template is not None else self._encode(flow)

    @property
    def shapes(self) -> dict[Shape, bool]:
        """Every shape seen, and whether it is templated (for tests and diagnostics)."""
        return {shape: t is not None for shape, t in self._templates.items()}
