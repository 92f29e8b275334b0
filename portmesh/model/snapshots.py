"""Which keys differ between two snapshots of the store's mappings: the one implementation.

Both compilers (the OVS flow compiler in the controller, the eBPF map compiler in the agent)
rebuild only the mappings that changed since their last compile, so each needs the keys
added, removed or bound to another object between the previous and the new snapshot. The
agent may not import the controller, so the function lives in the model, the one package
both may use; it imports nothing of ours.

Two snapshots are copies of one dict kept by the store's mirror: the very same key and value
objects in the same order, but for the few rows that changed (added rows at the end, removed
ones missing, changed ones holding another value). Walking both in order comparing identities
runs at C speed with no hashing, which matters: a MappingKey hashes through Python, so looking
up each of 100,000 keys costs ~30 ms, the most of a one-mapping change.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from itertools import compress, count, islice
from operator import is_not, or_
from typing import TypeVar, overload

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Differences after which walking two orders is no cheaper than looking every key up: each found
# difference re-skips the walk to its position, so the walk costs O(differences x size).
ALIGN_GIVE_UP = 32


@overload
def changed_keys(prev: Mapping[K, V], new: Mapping[K, V], limit: None = None) -> set[K]: ...


@overload
def changed_keys(prev: Mapping[K, V], new: Mapping[K, V], limit: int) -> set[K] | None: ...


def changed_keys(prev: Mapping[K, V], new: Mapping[K, V], limit: int | None = None) -> set[K] | None:
    """Keys added, removed or bound to another object (by identity) between two snapshots.

    ``limit=None`` never gives up: two dicts are walked in order while that is cheap (at most
    :data:`ALIGN_GIVE_UP` differences, no key moved); otherwise every key is looked up. The OVS
    compiler wants this: its caches are per mapping, so any answer is worth having.

    ``limit=n`` answers None instead of a set when more than ``n`` keys differ, or when the two
    are not copies of one dict in one order (not dicts, a key moved): the caller then computes
    afresh. The eBPF compiler wants this: past a share of the mappings a fresh compile is
    cheaper than patching, and then even the full comparison would be wasted.
    """
    if prev is new:
        return set()
    found = _walked(prev, new, limit) if isinstance(prev, dict) and isinstance(new, dict) else None
    if found is not None or limit is not None:
        return found
    return _looked_up(prev, new)


def _walked(prev: dict[K, V], new: dict[K, V], limit: int | None) -> set[K] | None:
    """The differences of two dicts of (mostly) the same objects in the same order, or None.

    None when a key moved, or past ``limit`` differences (past :data:`ALIGN_GIVE_UP` within the
    common length when there is no limit: a long tail of additions, a bulk add, stays cheap).
    Iterates the dicts themselves (islice skips at C speed): no copy into lists, no hashing but
    of the few keys that differ.
    """
    give_up = ALIGN_GIVE_UP if limit is None else limit
    dirty: set[K] = set()
    i = j = 0
    lp, ln = len(prev), len(new)
    while i < lp and j < ln:
        # The first position from (i, j) on where the keys or the values are other objects.
        keys = map(is_not, islice(prev, i, None), islice(new, j, None))
        values = map(is_not, islice(prev.values(), i, None), islice(new.values(), j, None))
        step = next(compress(count(), map(or_, keys, values)), None)
        if step is None:
            n = min(lp - i, ln - j)
            i, j = i + n, j + n
            break
        i, j = i + step, j + step
        if len(dirty) >= give_up:  # this difference would be one too many
            return None
        pkey, nkey = next(islice(prev, i, None)), next(islice(new, j, None))
        if pkey is nkey:  # the same key, another value: a changed mapping
            dirty.add(nkey)
            i, j = i + 1, j + 1
        elif pkey not in new:  # a removed key
            dirty.add(pkey)
            i += 1
        else:
            return None  # something moved: not two copies of one dict
    gone, added = list(islice(prev, i, None)), list(islice(new, j, None))
    if limit is not None and len(dirty) + len(gone) + len(added) > limit:
        return None
    if any(key in new for key in gone) or any(key in prev for key in added):
        return None  # moved, not gone or added
    dirty.update(gone)
    dirty.update(added)
    return dirty


def _looked_up(prev: Mapping[K, V], new: Mapping[K, V]) -> set[K]:
    """:func:`changed_keys` by looking every key up: right for any two mappings, at hashing speed."""
    dirty = {key for key, value in new.items() if prev.get(key) is not value}
    # Keys that went away: only worth a second pass over 100,000 keys when some did.
    fresh = sum(1 for key in dirty if key not in prev)
    if len(prev) != len(new) - fresh:
        dirty.update(prev.keys() - new.keys())
    return dirty
