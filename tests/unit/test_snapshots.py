"""Tier 1: ``changed_keys``, the one diff of two mapping snapshots both compilers use.

Every answer is checked against the naive comparison (look every key of both up); the two
give-up modes differ only in what they do when the ordered walk will not do.
"""

from __future__ import annotations

import random
from ipaddress import IPv4Address
from types import MappingProxyType

from hypothesis import given, settings
from hypothesis import strategies as st

from portmesh.model.entities import Mapping, MappingKey, Proto
from portmesh.model.snapshots import ALIGN_GIVE_UP, changed_keys

IP10 = IPv4Address("203.0.113.10")
OPS = ["add", "remove", "change", "readd"]


def key(n: int) -> MappingKey:
    return MappingKey(IP10, Proto.TCP, 1 + n)


def naive(prev: dict[MappingKey, Mapping], new: dict[MappingKey, Mapping]) -> set[MappingKey]:
    return {k for k in prev.keys() | new.keys() if prev.get(k) is not new.get(k)}


def edited(size: int, edits: list[tuple[str, int]]) -> tuple[dict[MappingKey, Mapping], dict[MappingKey, Mapping]]:
    """Two snapshots as the store's mirror hands them out: copies of one dict before and after ``edits``."""
    mirror = {key(n): Mapping(key(n), "c") for n in range(size)}
    prev = dict(mirror)
    for op, n in edits:
        k = key(n)
        if op == "add" and k not in mirror:
            mirror[k] = Mapping(k, "c")
        elif op == "remove":
            mirror.pop(k, None)
        elif op == "change" and k in mirror:
            mirror[k] = Mapping(k, "d")
        elif op == "readd" and k in mirror:  # removed and added again: same key, now at the end
            del mirror[k]
            mirror[k] = Mapping(k, "c")
    return prev, dict(mirror)


edits_st = st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 60)), max_size=45)


@settings(max_examples=300, deadline=None)
@given(size=st.integers(0, 40), edits=edits_st)
def test_without_limit_the_answer_is_the_naive_one_whatever_the_edits(size: int, edits: list[tuple[str, int]]) -> None:
    """Up to 45 edits: past ALIGN_GIVE_UP differences and on moved keys the walk gives up and every key is
    looked up, so the answer is always exact, both ways round."""
    prev, new = edited(size, edits)
    assert changed_keys(prev, new) == naive(prev, new)
    assert changed_keys(new, prev) == naive(prev, new)


@settings(max_examples=300, deadline=None)
@given(size=st.integers(0, 40), edits=edits_st, limit=st.integers(0, 50))
def test_with_a_limit_the_answer_is_exact_or_none(size: int, edits: list[tuple[str, int]], limit: int) -> None:
    """Never a wrong set: the naive one, or None. None exactly when more than ``limit`` keys differ or the
    second is not the first with keys dropped and keys appended (a re-added key is another object, at the
    end; backwards, a removal reads as an insertion in the middle); otherwise always the set."""
    prev, new = edited(size, edits)
    want = naive(prev, new)
    for a, b in ((prev, new), (new, prev)):
        same = {k: k for k in b}  # a key in both must be the very same object (a re-added key is another)
        walkable = all(same[k] is k for k in a if k in b) and \
            list(b) == [k for k in a if k in b] + [k for k in b if k not in a]
        got = changed_keys(a, b, limit)
        if len(want) > limit or not walkable:
            assert got is None
        else:
            assert got == want


@settings(max_examples=100, deadline=None)
@given(size=st.integers(0, 30), rng=st.randoms(use_true_random=False), changes=st.sets(st.integers(0, 29)))
def test_reordered_snapshots(size: int, rng: random.Random, changes: set[int]) -> None:
    """Snapshots that are not copies of one dict (another order): exact without a limit, None or exact with."""
    prev = {key(n): Mapping(key(n), "c") for n in range(size)}
    items = list(prev.items())
    rng.shuffle(items)
    new = {k: (Mapping(k, "d") if k.port - 1 in changes else m) for k, m in items}
    want = naive(prev, new)
    assert changed_keys(prev, new) == want
    assert changed_keys(prev, new, 1000) in (None, want)


def test_the_same_snapshot_or_an_equal_copy_has_no_change() -> None:
    prev, _ = edited(10, [])
    assert changed_keys(prev, prev) == set() and changed_keys(prev, prev, 0) == set()
    assert changed_keys(prev, dict(prev)) == set() and changed_keys(prev, dict(prev), 0) == set()


def test_an_equal_but_other_value_object_is_a_change() -> None:
    """Identity, not equality: the store hands a changed row over as a new object, and a compile keyed by
    identity must see it (an equal copy is cheap to recompile; a missed change is a wrong datapath)."""
    prev, _ = edited(3, [])
    new = dict(prev)
    new[key(1)] = Mapping(key(1), "c")
    assert new[key(1)] == prev[key(1)]
    assert changed_keys(prev, new) == {key(1)} and changed_keys(prev, new, 1) == {key(1)}


def test_a_bulk_add_at_the_end_is_walked_without_limit_and_bounded_with_one() -> None:
    """A bulk add lands in the tail: no limit takes it whole (ALIGN_GIVE_UP counts differences within the
    common part only); a limit below its size gives up."""
    prev, new = edited(100, [("add", 100 + n) for n in range(ALIGN_GIVE_UP * 3)])
    added = {key(100 + n) for n in range(ALIGN_GIVE_UP * 3)}
    assert changed_keys(prev, new) == added
    assert changed_keys(prev, new, len(added)) == added
    assert changed_keys(prev, new, len(added) - 1) is None


def test_past_align_give_up_without_limit_still_exact_and_with_a_high_limit_still_walked() -> None:
    changes = [("change", n) for n in range(0, 2 * ALIGN_GIVE_UP + 2, 2)]
    prev, new = edited(2 * ALIGN_GIVE_UP + 2, changes)
    want = naive(prev, new)
    assert len(want) == ALIGN_GIVE_UP + 1
    assert changed_keys(prev, new) == want
    assert changed_keys(prev, new, ALIGN_GIVE_UP + 1) == want
    assert changed_keys(prev, new, ALIGN_GIVE_UP) is None


def test_mappings_that_are_not_dicts() -> None:
    """A read-only view cannot be walked in order: looked up without a limit, None (compile afresh) with one."""
    prev, new = edited(5, [("change", 2), ("remove", 0), ("add", 9)])
    want = naive(prev, new)
    assert changed_keys(MappingProxyType(prev), MappingProxyType(new)) == want
    assert changed_keys(MappingProxyType(prev), new, 100) is None
    assert changed_keys(prev, MappingProxyType(new), 100) is None
