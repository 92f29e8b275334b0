"""update2 diffs (monitor_cond_since) applied to whole JSON rows, as ovsdb-server and the OVS IDL define them."""

from __future__ import annotations

from portmesh.store.update2 import MAP, SET, ZERO_UUID, RowCache, apply_diff, default_value


def test_a_set_diff_toggles_elements() -> None:
    assert sorted(apply_diff(["set", ["a", "b"]], ["set", ["b", "c"]], SET)[1]) == ["a", "c"]
    assert apply_diff(["set", []], "x", SET) == ["set", ["x"]]  # one element sent bare


def test_an_optional_scalar_gets_its_new_value_whole() -> None:
    """A set of at most one element: empty -> toggled in; non-empty -> the diff is the new value."""
    assert apply_diff(["set", []], "198.18.0.1", SET, single=True) == ["set", ["198.18.0.1"]]
    assert apply_diff("198.18.0.1", "198.18.0.2", SET, single=True) == "198.18.0.2"
    assert apply_diff("198.18.0.1", ["set", []], SET, single=True) == ["set", []]
    # Positive control: without ``single`` the same diff toggles.
    assert sorted(apply_diff("198.18.0.1", "198.18.0.2", SET)[1]) == ["198.18.0.1", "198.18.0.2"]


def test_a_map_diff_adds_removes_and_changes_pairs() -> None:
    old = ["map", [["a", "1"], ["b", "2"], ["c", "3"]]]
    new = apply_diff(old, ["map", [["a", "1"], ["b", "9"], ["d", "4"]]], MAP)
    assert dict(map(tuple, new[1])) == {"b": "9", "c": "3", "d": "4"}


def test_uuid_atoms_are_atoms_not_sets() -> None:
    u = ["uuid", ZERO_UUID]
    assert apply_diff(["set", [u]], u, SET) == ["set", []]
    assert default_value("uuid", "atom") == u
    assert default_value({"key": {"type": "string", "enum": ["set", ["udp", "tcp"]]}}, "atom") == "tcp"


def test_row_cache_fills_defaults_and_applies_modify_and_delete() -> None:
    kinds = {"Host": {"name": "atom", "datapath_id": "atom", "underlay_ip": SET}}
    defaults = {"Host": {"name": "", "datapath_id": 0, "underlay_ip": ["set", []]}}
    cache = RowCache(kinds, defaults, {"Host": {"underlay_ip"}})
    row = cache.change("Host", "u1", {"insert": {"name": "h1"}})
    assert row == ("h1", 0, ["set", []])
    row = cache.change("Host", "u1", {"modify": {"datapath_id": 7, "underlay_ip": "198.18.0.1"}})
    assert row == ("h1", 7, ["set", ["198.18.0.1"]])
    assert cache.index("Host") == {"name": 0, "datapath_id": 1, "underlay_ip": 2}
    assert cache.change("Host", "u1", {"delete": None}) is None
    assert cache.count() == 0
