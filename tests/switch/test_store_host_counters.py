"""Schema 1.8.0: an eBPF host's traffic report (Host.counters per counted mapping, Host.drops per reason).

On a real ovsdb-server: a 1.7.0 database is converted in place and its hosts read with no report;
the agent's report is written only when it changed and bumps no generation; what the API reads of a
mapping (``Store.mapping_counters``) is the master's OVS sum plus every host's report; a view made
with ``reports=False`` (an eBPF agent's) writes its report but is never woken by anybody's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from portmesh.model.entities import Backend, Host, Mapping, MappingCounters, MappingKey, Proto
from portmesh.store.client import Store
from portmesh.store.reader import StateReader
from tests.switch.old_schemas import older_schema, upgraded_store
from tests.switch.test_store import IP1, container, server
from tests.switch.test_store_mirror import wait_until

__all__ = ["server"]  # the fixture, re-used

pytestmark = pytest.mark.switch

KEY = MappingKey(IP1, Proto.TCP, 80)
LOCK = "portmesh_test_host_counters"


@pytest.fixture
def api(server: str) -> Iterator[Store]:
    """h1 with a1, h2 with b1, one mapping balanced over both."""
    with Store(server, timeout=10) as s:
        s.add_host(Host("h1", 1))
        s.add_host(Host("h2", 2))
        s.add_container(container("a1", "h1", block=32768))
        s.add_container(container("b1", "h2", block=33792))
        s.add_mapping(Mapping(KEY, "a1", backends=(Backend("a1", 1), Backend("b1", 1))))
        yield s


def test_a_1_7_0_database_is_upgraded_in_place_and_its_hosts_report_nothing(tmp_path: Path) -> None:
    with upgraded_store(tmp_path, older_schema(tmp_path, "1.7.0", "counters", "drops")) as store:
        assert store.host_drops("h1") == {} and store.host_counters("h1") == {}
        assert store.report_traffic("h1", {}, {"fence": 3})  # the new columns take a report
        wait_until(lambda: store.host_drops("h1") == {"fence": 3})


def test_the_api_reads_the_switches_sum_plus_every_hosts_report(api: Store, server: str) -> None:
    generation = api.snapshot().generation
    with Store(server, timeout=10, reports=False) as h1, Store(server, timeout=10, reports=False) as h2:
        assert h1.report_traffic("h1", {KEY: MappingCounters(5, 500, 1, 60)}, {"refused": 2})
        assert h2.report_traffic("h2", {KEY: MappingCounters(7, 700, 0, 0)}, {})
        wait_until(lambda: api.mapping_counters(KEY) == MappingCounters(12, 1200, 1, 60))
        assert api.host_drops("h1") == {"refused": 2} and api.host_drops("h2") == {}
        assert api.host_counters("h2") == {str(KEY): MappingCounters(7, 700, 0, 0)}
        # The master's OVS sum adds to them (a mixed cloud: each packet counted where it entered).
        with StateReader(server, timeout=10, lock=LOCK) as master:
            wait_until(master.lock_held)
            assert master.report_counters({KEY: MappingCounters(100, 10000, 3, 180)}) == 1
        wait_until(lambda: api.mapping_counters(KEY) == MappingCounters(112, 11200, 4, 240))
        # Unchanged: nothing written (no round trip), and reports never bump the generation.
        assert not h1.report_traffic("h1", {KEY: MappingCounters(5, 500, 1, 60)}, {"refused": 2})
        assert h1.report_traffic("h1", {KEY: MappingCounters(6, 560, 1, 60)}, {"refused": 2})  # positive control
        wait_until(lambda: api.mapping_counters(KEY).allowed_packets == 113)
        assert api.snapshot().generation == generation
        # A mapping gone drops out of the host's next report; another key is not summed in.
        other = MappingKey(IP1, Proto.UDP, 80)
        assert h1.report_traffic("h1", {other: MappingCounters(9, 9, 9, 9)}, {})
        wait_until(lambda: api.mapping_counters(KEY) == MappingCounters(107, 10700, 3, 180))
        assert api.mapping_counters(other) == MappingCounters()  # not mapped: zero, whoever reports it


def test_an_ebpf_agents_view_is_not_woken_by_reports(api: Store, server: str) -> None:
    with Store(server, timeout=10, reports=False) as h1, Store(server, timeout=10) as watcher:
        woken = threading.Event()
        h1.subscribe(woken.set)
        seen = threading.Event()
        watcher.subscribe(seen.set)
        wait_until(lambda: "a1" in h1.snapshot().containers and "a1" in watcher.snapshot().containers)
        woken.clear()
        seen.clear()
        with Store(server, timeout=10, reports=False) as h2:
            assert h2.report_traffic("h2", {KEY: MappingCounters(1, 60, 0, 0)}, {"fence": 1})
            wait_until(lambda: watcher.host_drops("h2") == {"fence": 1})  # positive control: a whole view hears it
            assert seen.is_set()
            assert not woken.is_set()
            api.add_container(container("a2", "h1", block=34816))  # a desired change still wakes it
            wait_until(woken.is_set)
            wait_until(lambda: "a2" in h1.snapshot().containers)  # sent after the report: it never came
            assert h1.host_drops("h2") == {} and h1.mapping_counters(KEY) == MappingCounters()
