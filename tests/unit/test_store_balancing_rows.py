"""Schema 1.6.0's Mapping columns <-> the model's Mapping, without a server (rows.py)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from types import SimpleNamespace

from portmesh.model.entities import Backend, HealthCheck, HealthKind, Mapping, MappingCounters, MappingKey, Proto
from portmesh.store import rows as R

KEY = MappingKey(IPv4Address("203.0.113.10"), Proto.TCP, 80)


def row_of(m: Mapping, backend_health: dict[str, str] | None = None) -> SimpleNamespace:
    """A row as the IDL would read it after fill_mapping_row."""
    row = SimpleNamespace()
    R.fill_mapping_row(row, m)
    row.backend_health = backend_health or {}
    return row


def test_a_plain_mapping_writes_empty_policy_columns_and_reads_back_plain() -> None:
    row = row_of(Mapping(KEY, "web"))
    assert (row.backends, row.allow, row.deny, row.health) == ({}, [], [], {})
    assert R.mapping_from_row(row) == Mapping(KEY, "web") == R.plain_mapping("203.0.113.10", "tcp", 80, "web")
    assert R.backends_column(Mapping(KEY, "web", backends=(Backend("web", 3),))) == {"web": 3}  # not plain


def test_every_field_round_trips_and_later_backends_come_back_by_name() -> None:
    check = HealthCheck(HealthKind.HTTP, 8080, "/ready", 204, 0.3, 0.1, 4)
    m = Mapping(KEY, "web-z", backends=(Backend("web-z", 2), Backend("web-b"), Backend("web-a", 5)),
                allow=(IPv4Network("198.51.100.0/25"),), deny=(IPv4Network("198.51.100.7/32"),), health=check)
    got = R.mapping_from_row(row_of(m))
    assert got.names == ("web-z", "web-a", "web-b")  # the first stays first, the rest by name
    assert set(got.backends) == set(m.backends)
    assert (got.allow, got.deny, got.health) == (m.allow, m.deny, check)
    assert R.health_from_column(R.health_column(HealthCheck())) == HealthCheck()


def test_down_counts_only_backends_reported_down_while_a_check_exists() -> None:
    m = Mapping(KEY, "a", backends=(Backend("a"), Backend("b"), Backend("c")), health=HealthCheck())
    reports = {"a": "up", "b": "down: timeout", "gone": "down: x"}  # "gone" is no backend; c is unchecked
    assert R.mapping_from_row(row_of(m, reports)).down == {"b"}
    unchecked = Mapping(KEY, "a", backends=m.backends)
    assert R.mapping_from_row(row_of(unchecked, reports)).down == frozenset()  # a late report without a check


def test_counters_round_trip_and_default_to_zero() -> None:
    c = MappingCounters(1, 2, 3, 4)
    assert R.counters_from_column(R.counters_column(c)) == c
    assert R.counters_from_column({}) == MappingCounters()
    op = R.counters_update("u-1", c)
    assert op["where"] == [["_uuid", "==", ["uuid", "u-1"]]]
    assert dict(op["row"]["counters"][1]) == {"allowed_packets": 1, "allowed_bytes": 2, "denied_packets": 3,
                                              "denied_bytes": 4}


def test_a_change_writes_only_the_columns_that_differ() -> None:
    old = Mapping(KEY, "a", backends=(Backend("a"), Backend("b")))
    new = Mapping(KEY, "a", backends=old.backends, deny=(IPv4Network("198.51.100.7/32"),))
    row = SimpleNamespace()
    R.fill_mapping_change(row, new, old)
    assert vars(row) == {"deny": ["198.51.100.7/32"]}
