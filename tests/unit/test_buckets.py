"""Tier 1: the source-port bucket table of balanced mappings on OVS (portmesh/model/buckets.py).

The bounds asserted here are the table's stated properties: each backend holds its weight's share of
the 256 buckets within its own slot count, and adding or removing one backend moves at most 1.5 times
the ideal number of buckets (its share), at most 0.5 of a share of them between backends that stay.
"""

from __future__ import annotations

import itertools

from portmesh.model.buckets import BUCKET_MASK, N_BUCKETS, bucket_of, bucket_table, spread_error
from portmesh.model.slots import slots


def moved(a: list[str], b: list[str]) -> int:
    return sum(x != y for x, y in zip(a, b, strict=True))


def test_shape_and_determinism() -> None:
    s = slots([("a", 1), ("b", 1), ("c", 2)])
    t = bucket_table(s)
    assert len(t) == N_BUCKETS and set(t) == {"a", "b", "c"}
    assert t == bucket_table(list(s)), "pure: no salted hash, no state"
    assert bucket_table([]) == []
    assert bucket_table(["only"]) == ["only"] * N_BUCKETS


def test_spread_within_one_slot_count_of_the_weights() -> None:
    for weights in ([1, 1], [1, 1, 1], [1, 2], [1, 1, 2], [3, 1, 7], [10, 1, 1, 1], [1] * 7, [5, 9, 2, 2, 1]):
        s = slots([(f"b{i}", w) for i, w in enumerate(weights)])
        err = spread_error(s, bucket_table(s))
        for name, e in err.items():
            assert abs(e) <= s.count(name), (weights, err)


def test_adding_or_removing_a_backend_moves_little() -> None:
    for n in range(2, 9):
        names = [f"web-{i}" for i in range(n)]
        table = bucket_table(names)
        grown = bucket_table([*names, "new"])
        assert moved(table, grown) <= 1.5 * N_BUCKETS / (n + 1), n
        for gone in names:
            shrunk = bucket_table([x for x in names if x != gone])
            assert moved(table, shrunk) <= 1.5 * N_BUCKETS / n, (n, gone)
            stay = sum(a != b and a != gone for a, b in zip(table, shrunk, strict=True))
            assert stay <= 0.5 * N_BUCKETS / n, (n, gone, stay)


def test_order_of_equal_backends_hardly_matters() -> None:
    """The permutations depend on names only: another order of the same backends spreads as evenly."""
    for names in itertools.permutations(["a", "b", "c"]):
        t = bucket_table(list(names))
        assert all(abs(t.count(n) - N_BUCKETS / 3) <= 1 for n in names)


def test_bucket_of_uses_bits_1_to_8() -> None:
    assert BUCKET_MASK == 0x1FE
    assert bucket_of(40000) == bucket_of(40001) == (40000 >> 1) & 0xFF
    assert {bucket_of(p) for p in range(32768, 32768 + 512, 2)} == set(range(N_BUCKETS))
