"""The weight-expanded slots a balanced mapping spreads new connections over.

Shared by both datapaths' compilers (the OVS flow compiler's ``multipath`` and the eBPF
compiler's ``slots`` map), so a mapping balances by the same rule on every host whatever its
datapath. Pure; the datapath then picks a slot per connection by rendezvous (HRW) hashing.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import gcd

# OVS's multipath uses HRW only up to 64 links (more fall back to another algorithm): weights are
# reduced by their gcd and, if still over, scaled down (each backend keeps at least one slot). The
# eBPF program's HRW loop is bounded by the same number.
MAX_SLOTS = 64


def slots(weights: Sequence[tuple[str, int]]) -> list[str]:
    """Backend names expanded by weight, in backend order (so adding a backend appends slots and keeps
    the others' slot numbers: HRW then moves only connections the new slots win)."""
    if not weights:
        return []
    g = 0
    for _name, w in weights:
        g = gcd(g, w)
    reduced = [(name, w // g) for name, w in weights]
    total = sum(w for _n, w in reduced)
    if total > MAX_SLOTS:
        reduced = [(name, max(1, w * MAX_SLOTS // total)) for name, w in reduced]
        while sum(w for _n, w in reduced) > MAX_SLOTS:  # the max(1, ..) may have pushed it over
            i = max(range(len(reduced)), key=lambda j: reduced[j][1])
            reduced[i] = (reduced[i][0], reduced[i][1] - 1)
    return [name for name, w in reduced for _ in range(w)]


__all__ = ["MAX_SLOTS", "slots"]
