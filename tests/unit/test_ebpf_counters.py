"""The eBPF agent's traffic report (agent/ebpf/counters.py) against in-memory maps and a fake store.

Only filtered or balanced mappings are reported (as OVS counts them; plain and health-check-only
mappings never reach the store), per-CPU slots are summed, drops with no packets are left out, an
unchanged report is not written again, a host not registered yet writes nothing, and a failing
round neither stops the loop nor delays the next.
"""

from __future__ import annotations

import asyncio
import io
import struct
from collections.abc import Mapping as MappingABC
from dataclasses import replace

from fastapi.testclient import TestClient
from rich.console import Console

from portmesh.agent.ebpf import counters as ecount
from portmesh.agent.ebpf import layout, sync
from portmesh.agent.ebpf.compile import mapping_key
from portmesh.api.app import create_app
from portmesh.cli import render
from portmesh.model.entities import DesiredState, MappingCounters, MappingKey, Proto
from tests.unit.fakes import FakeStore as ApiStore
from tests.unit.test_ebpf_compile import IP10, IP11, STATE
from tests.unit.test_ebpf_sync import CPUS, FakeMap, fake_maps

BALANCED = MappingKey(IP10, Proto.TCP, 443)
FILTERED = MappingKey(IP11, Proto.TCP, 25)
PLAIN = MappingKey(IP10, Proto.TCP, 80)
CHECKED = MappingKey(IP11, Proto.TCP, 26)  # a health check alone: plain while up, not counted


class FakeStore:
    """``Store.snapshot`` and ``Store.report_traffic`` (written only when different, as the real one)."""

    def __init__(self, state: DesiredState) -> None:
        self.state = state
        self.rows: dict[str, tuple[dict[MappingKey, MappingCounters], dict[str, int]]] = {}
        self.writes = 0
        self.fail = 0  # the next calls that raise (the store away)

    def snapshot(self) -> DesiredState:
        return self.state

    def report_traffic(self, host: str, counters: MappingABC[MappingKey, MappingCounters],
                       drops: MappingABC[str, int]) -> bool:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("store away")
        want = (dict(counters), dict(drops))
        if self.rows.get(host) == want:
            return False
        self.rows[host] = want
        self.writes += 1
        return True


def per_cpu(*slots: tuple[int, int]) -> bytes:
    return b"".join(struct.pack("=QQ", p, b) for p, b in slots)


def maps_with_traffic() -> dict[str, FakeMap]:
    maps = fake_maps([])
    maps["mapping_stats"].data[mapping_key(BALANCED)] = per_cpu((3, 300), (4, 400), (0, 0))
    maps["mapping_stats"].data[mapping_key(PLAIN)] = per_cpu((50, 5000), (0, 0), (0, 0))  # counted, not reported
    maps["mapping_stats"].data[mapping_key(FILTERED)] = per_cpu((1, 60), (0, 0), (1, 60))
    maps["mapping_denied"].data[mapping_key(FILTERED)] = per_cpu((0, 0), (5, 200), (0, 0))
    maps["drops"].data[struct.pack("=I", layout.DropReason.REFUSED)] = per_cpu((2, 120), (1, 60), (0, 0))
    maps["drops"].data[struct.pack("=I", layout.DropReason.FENCE)] = per_cpu((0, 0), (0, 0), (0, 0))
    return maps


def test_only_filtered_or_balanced_mappings_are_reported_summed_over_the_cpus() -> None:
    assert CPUS == 3
    assert set(ecount.counted_keys(STATE)) == {BALANCED, FILTERED}  # PLAIN and CHECKED are not
    store = FakeStore(STATE)
    reporter = ecount.TrafficReporter("h1", store, maps_with_traffic)
    assert reporter.once()
    counters, drops = store.rows["h1"]
    assert counters == {BALANCED: MappingCounters(7, 700, 0, 0), FILTERED: MappingCounters(2, 120, 5, 200)}
    assert drops == {"refused": 3}  # reasons with no packets are left out


def test_an_unchanged_report_is_not_written_again_and_a_change_is() -> None:
    store = FakeStore(STATE)
    maps = maps_with_traffic()
    reporter = ecount.TrafficReporter("h1", store, lambda: maps)
    assert reporter.once() and not reporter.once()
    assert store.writes == 1 and reporter.reports == 1
    maps["mapping_stats"].data[mapping_key(BALANCED)] = per_cpu((3, 300), (4, 400), (1, 100))
    assert reporter.once()
    assert store.rows["h1"][0][BALANCED] == MappingCounters(8, 800, 0, 0)


def test_the_counted_mappings_follow_the_desired_state() -> None:
    store = FakeStore(STATE)
    reporter = ecount.TrafficReporter("h1", store, maps_with_traffic)
    assert reporter.once() and set(store.rows["h1"][0]) == {BALANCED, FILTERED}
    gone = dict(STATE.mappings)
    del gone[FILTERED]
    store.state = replace(STATE, generation=STATE.generation + 1, mappings=gone)
    assert reporter.once() and set(store.rows["h1"][0]) == {BALANCED}  # a removed mapping leaves the report


def test_a_mapping_without_entries_yet_counts_zero_and_an_unknown_host_writes_nothing() -> None:
    store = FakeStore(STATE)
    empty = fake_maps([])
    assert ecount.TrafficReporter("h1", store, lambda: empty).once()
    assert store.rows["h1"] == ({BALANCED: MappingCounters(), FILTERED: MappingCounters()}, {})
    assert not ecount.TrafficReporter("h9", store, lambda: empty).once()  # not registered: nowhere to write
    assert "h9" not in store.rows


def test_the_loop_survives_failing_rounds_and_stops_when_asked() -> None:
    store = FakeStore(STATE)
    store.fail = 2
    maps = maps_with_traffic()
    reporter = ecount.TrafficReporter("h1", store, lambda: maps, interval=0.01)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.ensure_future(reporter.run(stop))
        for _ in range(500):
            if store.writes:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert store.fail == 0 and store.writes == 1  # two failures, then the report


def test_the_reported_maps_are_the_datapaths_stat_maps() -> None:
    asked: list[str] = []

    def map_of(name: str) -> FakeMap:
        asked.append(name)
        return FakeMap(name, [], 16)

    assert set(ecount.datapath_maps(map_of)) == {sync.STATS, sync.DENIED, "drops"} == set(asked)
    assert set(asked) <= set(layout.STAT_MAPS)


def test_the_hosts_listing_shows_an_ebpf_hosts_drops() -> None:
    """``GET /v1/hosts`` (and one host) carries what the agent reported; ``portmesh hosts`` prints a DROPS
    column only when some host reports drops (an all-OVS cloud's table is unchanged)."""
    store = ApiStore()
    auth = {"Authorization": "Bearer t0ken-for-drops"}
    with TestClient(create_app(store, "t0ken-for-drops", wait_timeout=2.0), headers=auth) as client:
        for name in ("h1", "h2"):
            assert client.post("/v1/hosts", json={"name": name}).status_code == 201
        plain = client.get("/v1/hosts").json()
        assert [h["drops"] for h in plain] == [{}, {}]
        store.drops["h2"] = {"refused": 40, "fence": 2}
        items = client.get("/v1/hosts").json()
        assert [h["drops"] for h in items] == [{}, {"refused": 40, "fence": 2}]
        assert client.get("/v1/hosts/h2").json()["drops"] == {"refused": 40, "fence": 2}

    def shown(hosts: list[dict[str, object]]) -> str:
        buf = io.StringIO()
        render.hosts(Console(file=buf, width=300), hosts)
        return buf.getvalue()

    assert "DROPS" not in shown(plain)
    table = shown(items)
    assert "DROPS" in table and "refused=40 fence=2" in table
