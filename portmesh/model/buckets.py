"""The bucket table a balanced mapping spreads new connections over on OVS: source-port bucket -> backend.

OVS picks a new connection's backend with a plain masked match on the client's source port (bits 1-8,
256 buckets; see :mod:`portmesh.controller.balancing`), not with a hash action, so that no packet needs
an upcall of its own. The buckets are filled here, Maglev-style (Eisenbud et al., NSDI 2016): every
backend has its own pseudo-random permutation of the buckets, derived from its name only, and the
backends take turns (one turn per weight-expanded slot of :func:`portmesh.model.slots.slots`) claiming
the next free bucket of their permutation. Hence:

- spread: per full round each backend gets exactly its slot count, so a backend holds its weight's
  share of the 256 buckets within one slot count (:func:`spread_error` bounds it, the tests check it);
- stability: a backend's preferences do not depend on the others, so adding or removing one moves
  mostly the buckets it takes or gives back: 3 -> 4 equal backends moves 67 of 256 buckets (ideal 64),
  removing one of 4 moves 72; over 2-8 backends at most 1.5 times the ideal, at most half a share
  between backends that stay (tests/unit/test_buckets.py asserts these bounds).

Moving a bucket never moves an established connection: those are pinned by conntrack, and a bucket
only chooses for a connection's first packet. Pure and deterministic across processes (blake2b, never
Python's salted ``hash``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

BUCKET_BITS = 8
N_BUCKETS = 1 << BUCKET_BITS
# The bits of the source port that choose the bucket: Linux's connect() hands out even ports first
# (net.ipv4.ip_local_port_range parity), so bit 0 is nearly constant and bits 1-8 are used.
BUCKET_SHIFT = 1
BUCKET_MASK = (N_BUCKETS - 1) << BUCKET_SHIFT


def _permutation(name: str) -> tuple[int, int]:
    """(offset, skip) of a backend's permutation of the buckets: an odd skip walks all 256."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    offset = int.from_bytes(digest[:4], "big") % N_BUCKETS
    skip = (int.from_bytes(digest[4:], "big") % (N_BUCKETS // 2)) * 2 + 1
    return offset, skip


def bucket_table(slots: Sequence[str]) -> list[str]:
    """The backend name of each of the 256 buckets, given the weight-expanded ``slots`` (a name
    appears once per unit of weight). Empty ``slots``: an empty table."""
    if not slots:
        return []
    names = list(dict.fromkeys(slots))
    perm = {n: _permutation(n) for n in names}
    nxt = dict.fromkeys(names, 0)
    table: list[str | None] = [None] * N_BUCKETS
    filled = 0
    while True:
        for name in slots:
            offset, skip = perm[name]
            while True:
                b = (offset + nxt[name] * skip) % N_BUCKETS
                nxt[name] += 1
                if table[b] is None:
                    break
            table[b] = name
            filled += 1
            if filled == N_BUCKETS:
                return [n for n in table if n is not None]


def spread_error(slots: Sequence[str], table: Sequence[str]) -> dict[str, float]:
    """Per backend: buckets held minus its weight's share of the buckets (in buckets)."""
    total = len(slots)
    return {n: table.count(n) - N_BUCKETS * slots.count(n) / total for n in dict.fromkeys(slots)}


def bucket_of(sport: int) -> int:
    """The bucket a source port falls in (what the switch's masked match computes)."""
    return (sport & BUCKET_MASK) >> BUCKET_SHIFT


__all__ = ["BUCKET_MASK", "BUCKET_SHIFT", "N_BUCKETS", "bucket_of", "bucket_table", "spread_error"]
