"""Write a compiled host image into the eBPF maps: only the difference, in an order with no bad window.

:class:`MapSync` keeps what it believes each map holds (the *image*: key bytes -> value
bytes). On its first pass it adopts what the maps already hold, so an agent that restarts
against the pinned maps of its predecessor writes nothing when the state is unchanged and
traffic never notices. Every later pass diffs the compiled image against its own and writes
adds and changes first, then deletes (see :data:`ADD_PHASES` for the order and why).

A failed write raises (the kernel's ``OSError``: a full map, say) after the image has
recorded every write that succeeded, so the next pass resumes with what is still missing.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from portmesh.agent.ebpf import layout
from portmesh.agent.ebpf.compile import Compiled, mapping_key
from portmesh.model.entities import MappingKey

STATS = "mapping_stats"
DENIED = "mapping_denied"
BPF_NOEXIST = 1  # create only: never overwrite a counter the program has been adding to
POSSIBLE_CPUS = Path("/sys/devices/system/cpu/possible")
_COUNTER = struct.Struct("=QQ")  # struct pm_counter
_U32 = struct.Struct("=I")
_POOL = _U32.pack(layout.NET_POOL)


class MapLike(Protocol):
    """What the sync needs of a map (``loader.BpfMap`` has it; unit tests use an in-memory fake).

    Per-CPU maps: ``lookup`` returns every CPU's value back to back, each ``value_size``
    rounded up to 8 bytes; ``update`` takes the same layout.
    """

    @property
    def value_size(self) -> int: ...

    def update(self, key: bytes, value: bytes, flags: int = ...) -> None: ...

    def delete(self, key: bytes) -> bool: ...

    def lookup(self, key: bytes) -> bytes | None: ...

    def keys(self) -> Iterator[bytes]: ...

    def items(self) -> Iterator[tuple[bytes, bytes]]: ...


def _every(_value: bytes) -> bool:
    return True


def _fence(value: bytes) -> bool:
    return value != _POOL


def _pool(value: bytes) -> bool:
    return value == _POOL


# Adds and changes, map by map in this order; deletes run afterwards in the reverse order.
# The rule: an entry is written only once everything a frame it lets through will need is in,
# so no frame is mis-delivered and none refused that the state admits.
# - networks (fences): protected and link-local networks are dropped before anything new can send.
# - owned_ips, blocks, macs, then ports: a port is known (may send at all) only once its source
#   addresses, its reply block and the L2 entry that brings tunnelled replies back are in.
# - backends, slots, policy, then mapping_stats (+ mapping_denied), then mappings: a balanced or
#   filtered mapping's entry names the version of its slots and policy (a hash of their content),
#   so a change writes the new version's entries first, flips the entry (one atomic write), and
#   deletes the old version's entries only after it: no window without rules or with a mix.
#   A new backend is known (may send from the mapped port, may keep its connections) before the
#   entry sends it anything; a removed one is forgotten only after. The counters exist before the
#   mapping counts into them, and a mapping delivers to a port that may already answer from the
#   mapped port.
# - public_ips, then pools: an address is answered (ARP, echo, refusals) and a pool classified
#   as ours only once its mappings are in, so a new address is never refused for a moment.
# - config last: it holds the gateway's ARP answer and the host's way out; on a fresh host no
#   container can send anything (it cannot resolve its next hop) until every return path is in.
# Deletes in reverse: a mapping goes before the port it leads to, the port before its addresses
# and block, the fences last. (A vanished port's ifindex is not reused in that window: the
# kernel allocates ifindexes cyclically.)
ADD_PHASES: tuple[tuple[str, Callable[[bytes], bool]], ...] = (
    ("networks", _fence),
    ("owned_ips", _every),
    ("blocks", _every),
    ("macs", _every),
    ("ports", _every),
    ("backends", _every),
    ("slots", _every),
    ("policy", _every),
    (STATS, _every),
    ("mappings", _every),
    ("public_ips", _every),
    ("networks", _pool),
    ("config", _every),
)
NEVER_DELETED = frozenset({"config"})  # an array: its one entry always exists


@dataclass
class SyncStats:
    """What one pass wrote, per map (adds, changes, deletes)."""

    added: dict[str, int] = field(default_factory=dict)
    changed: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)

    @property
    def writes(self) -> int:
        return sum(self.added.values()) + sum(self.changed.values()) + sum(self.deleted.values())

    def __str__(self) -> str:
        parts = [f"{what} {name}={n}" for what, d in (("+", self.added), ("~", self.changed), ("-", self.deleted))
                 for name, n in sorted(d.items()) if n]  # fmt: skip
        return ", ".join(parts) or "no writes"


def possible_cpus(path: Path = POSSIBLE_CPUS) -> int:
    """How many CPUs a per-CPU map holds a value for (``0-3``, ``0,2-5``...), as the kernel counts them."""
    total = 0
    for part in path.read_text().strip().split(","):
        first, _, last = part.partition("-")
        total += int(last or first) - int(first) + 1
    return total


def percpu_size(value_size: int, cpus: int) -> int:
    return (value_size + 7) // 8 * 8 * cpus


class MapSync:
    """The maps' image and the writes that bring it to a compiled one (see the module docstring)."""

    def __init__(self, cpus: int | None = None) -> None:
        self._cpus = cpus
        self._image: dict[str, dict[bytes, bytes]] | None = None
        self._stats: set[bytes] = set()
        self._denied: set[bytes] = set()
        self._applied: dict[str, object] = {}  # map -> the compiled dict (or stat key set) it fully holds

    @property
    def cpus(self) -> int:
        if self._cpus is None:
            self._cpus = possible_cpus()
        return self._cpus

    def image(self, name: str) -> dict[bytes, bytes]:
        """What this sync believes ``name`` holds (empty before the first pass)."""
        return dict((self._image or {}).get(name, {}))

    def forget(self) -> None:
        """Adopt the maps' content again on the next pass (after something else wrote to them)."""
        self._image = None
        self._applied.clear()

    def _adopt(self, maps: Mapping[str, MapLike], names: list[str]) -> dict[str, dict[bytes, bytes]]:
        image = {name: dict(maps[name].items()) for name in names}
        self._stats = set(maps[STATS].keys())
        self._denied = set(maps[DENIED].keys()) if DENIED in maps else set()
        return image

    def apply(self, maps: Mapping[str, MapLike], compiled: Compiled) -> SyncStats:
        """Write what differs between the maps and ``compiled``; returns what was written.

        ``maps`` holds every map of ``compiled.maps`` and ``mapping_stats``. On a failed write
        the exception propagates; the image keeps every write done, so the next pass resumes.
        """
        done = SyncStats()
        if self._image is None:
            self._image = self._adopt(maps, list(compiled.maps))
        image = self._image
        applied, self._applied = self._applied, {}  # restored only if the whole pass succeeds
        try:
            adds: dict[str, list[tuple[bytes, bytes]]] = {}
            gone: dict[str, list[bytes]] = {}
            for name, want in compiled.maps.items():
                have = image.setdefault(name, {})
                if applied.get(name) is want:
                    adds[name], gone[name] = [], []
                    continue
                get = have.get
                adds[name] = changed = [(k, v) for k, v in want.items() if get(k) != v]
                # Keys held but no longer wanted: looked for only when the counts say there are some.
                kept = len(want) - sum(1 for k, _v in changed if k not in have)
                gone[name] = [k for k in have if k not in want] if len(have) > kept else []
            for name, admit in ADD_PHASES:
                if name == STATS:
                    if applied.get(STATS) is not compiled.stat_keys:
                        self._create_stats(maps[STATS], compiled.stat_keys, done)
                    if applied.get(DENIED) is not compiled.denied_keys and (compiled.denied_keys or self._denied):
                        self._create_stats(maps[DENIED], compiled.denied_keys, done, self._denied, DENIED)
                    continue
                have, m = image[name], maps[name]
                for key, value in adds[name]:
                    if admit(value):
                        new = key not in have
                        m.update(key, value)
                        have[key] = value
                        bucket = done.added if new else done.changed
                        bucket[name] = bucket.get(name, 0) + 1
            for name, admit in reversed(ADD_PHASES):
                if name == STATS:
                    if applied.get(STATS) is not compiled.stat_keys:
                        self._delete_stats(maps[STATS], compiled.stat_keys, done)
                    if applied.get(DENIED) is not compiled.denied_keys and self._denied:
                        self._delete_stats(maps[DENIED], compiled.denied_keys, done, self._denied, DENIED)
                    continue
                if name in NEVER_DELETED:
                    continue
                have, m = image[name], maps[name]
                for key in gone[name]:
                    held = have.get(key)
                    if held is not None and admit(held):
                        m.delete(key)
                        del have[key]
                        done.deleted[name] = done.deleted.get(name, 0) + 1
        except OSError as exc:
            exc.add_note(f"map sync: {done} written before the failure (the next pass resumes)")
            raise
        self._applied = {**compiled.maps, STATS: compiled.stat_keys, DENIED: compiled.denied_keys}
        return done

    def _create_stats(self, m: MapLike, keys: frozenset[bytes], done: SyncStats, held: set[bytes] | None = None,
                      name: str = STATS) -> None:
        """A zeroed counter for each key that has none; an existing one is never overwritten (it would
        reset the counters the program has been adding to). ``held``: the keys the map has (mapping_stats'
        by default)."""
        held = self._stats if held is None else held
        missing = keys - held
        if not missing:
            return
        zero = bytes(percpu_size(m.value_size, self.cpus))
        for key in missing:
            try:
                m.update(key, zero, BPF_NOEXIST)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise
            else:
                done.added[name] = done.added.get(name, 0) + 1
            held.add(key)

    def _delete_stats(self, m: MapLike, keys: frozenset[bytes], done: SyncStats, held: set[bytes] | None = None,
                      name: str = STATS) -> None:
        held = self._stats if held is None else held
        for key in [k for k in held if k not in keys]:
            m.delete(key)
            held.discard(key)
            done.deleted[name] = done.deleted.get(name, 0) + 1


def _sum(m: MapLike, raw: bytes | None) -> tuple[int, int]:
    """A per-CPU ``pm_counter`` value summed over the CPUs: (packets, bytes)."""
    if raw is None:
        return 0, 0
    slot = (m.value_size + 7) // 8 * 8
    packets = octets = 0
    for i in range(0, len(raw) - _COUNTER.size + 1, slot):
        p, b = _COUNTER.unpack_from(raw, i)
        packets += p
        octets += b
    return packets, octets


def read_counters(maps: Mapping[str, MapLike], key: MappingKey) -> tuple[int, int]:
    """(packets, bytes) the program delivered through the mapping on this host, summed over the CPUs."""
    m = maps[STATS]
    return _sum(m, m.lookup(mapping_key(key)))


def read_denied(maps: Mapping[str, MapLike], key: MappingKey) -> tuple[int, int]:
    """(packets, bytes) the mapping's firewall dropped on this host, summed over the CPUs."""
    m = maps[DENIED]
    return _sum(m, m.lookup(mapping_key(key)))


def read_drops(maps: Mapping[str, MapLike]) -> dict[layout.DropReason, tuple[int, int]]:
    """(packets, bytes) dropped per reason on this host, summed over the CPUs."""
    m = maps["drops"]
    return {reason: _sum(m, m.lookup(_U32.pack(reason))) for reason in layout.DropReason}
