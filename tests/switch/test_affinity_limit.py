"""Tier 2: the AFFINITY table's cap (issue 15 leftover): a SYN flood cannot fill it without bound.

The agent's Bridge.ensure writes br0's Flow_Table row for table 7 (flow_limit from BridgeSpec,
overflow_policy=evict); the real controller programs a real dummy-datapath ovs-vswitchd, and SYNs
injected with ``netdev-dummy/receive`` make the switch run its learn actions. What OVS promises
(ovs-vswitchd.conf.db(5), Flow_Table): when an add would exceed flow_limit it evicts, among flows
with an idle or hard timeout only, the one that expires soonest (lowest importance first; all
learned flows have importance 0). OVS ranks by expiry in ~1 s steps (milliseconds >> 10) and
re-reads each flow's last-used time for that ranking about once a second, so a connection is
protected from a flood once its last packet is a few seconds newer than the flood's entries.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from portmesh.agent.bridge import AFFINITY_TABLE, AFFINITY_TABLE_NAME, Bridge, BridgeSpec
from portmesh.controller.pipeline import Table
from portmesh.lab.dummy_ovs import DummyOVS
from tests.switch.test_balancing_trace import ACK, build_state, packet
from tests.switch.test_pipeline_trace import setup

LIMIT = 40
CLIENT = "198.51.100.60"  # the established connections' client
FLOOD = "198.51.100.61"  # the flood's source (one address, a new source port per SYN)


def test_agent_table_number_is_the_controllers() -> None:
    """The agent cannot import the controller (components meet through the store): pinned here."""
    assert (Table.AFFINITY.number, Table.AFFINITY.name) == (AFFINITY_TABLE, AFFINITY_TABLE_NAME)


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="affinity_flow_limit"):
        BridgeSpec(1, "0a:00:00:00:00:01", ("tcp:127.0.0.1:6653",), affinity_flow_limit=0)


@pytest.fixture
def bridge(dummy_ovs: DummyOVS) -> Iterator[Bridge]:
    b = Bridge(f"unix:{dummy_ovs.db_sock}")
    b.start()
    try:
        yield b
    finally:
        b.close()


def frame(ovs: DummyOVS, src: str, sport: int, flags: str = "0x02") -> str:
    """One TCP segment to the balanced mapping, as hex for ``netdev-dummy/receive`` on br0's LOCAL port."""
    spec = packet(src, sport, flags=flags).replace("in_port=LOCAL,", "").replace("dl_", "eth_")
    dump = ovs.ofctl("compose-packet", spec)
    return "".join("".join(line[10:59].replace("-", " ").split()) for line in dump.splitlines())


def affinity(ovs: DummyOVS) -> list[str]:
    out = ovs.ofctl("dump-flows", "br0", f"table={AFFINITY_TABLE}")
    return [line.strip() for line in out.splitlines() if "actions=" in line]


def has_conn(ovs: DummyOVS, src: str, sport: int) -> bool:
    return any(f"nw_src={src}," in f and f"tp_src={sport}," in f for f in affinity(ovs))


def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def flood(ovs: DummyOVS, sports: range, peak: list[int]) -> None:
    """SYNs from FLOOD, one new 5-tuple each, 10 per receive call; the table is counted after each call."""
    frames = [frame(ovs, FLOOD, s) for s in sports]
    for i in range(0, len(frames), 10):
        ovs.appctl("netdev-dummy/receive", "br0", *frames[i:i + 10])
        peak.append(len(affinity(ovs)))
    until(lambda: has_conn(ovs, FLOOD, sports[-1]), f"the flood's last SYN (port {sports[-1]}) learned")
    peak.append(len(affinity(ovs)))


def advertised_limit(ovs: DummyOVS) -> int | None:
    """The cap ovs-vswitchd applies to table 7, as it tells controllers (table features: name, max_entries)."""
    out = ovs.ofctl("dump-table-features", "br0")
    found = re.search(rf'table {AFFINITY_TABLE} \("{AFFINITY_TABLE_NAME}"\):.*?max_entries=(\d+)', out, re.S)
    return int(found.group(1)) if found else None


def versions(ovs: DummyOVS) -> str:
    """Every Flow_Table row's ``_version``, which OVSDB changes on any write to the row."""
    query = ('["Open_vSwitch", {"op": "select", "table": "Flow_Table", "where": [], '
             '"columns": ["_uuid", "_version"]}]')
    return ovs._run("ovsdb-client", "transact", f"unix:{ovs.db_sock}", query)


def test_flood_is_capped_and_live_connections_survive(dummy_ovs: DummyOVS, bridge: Bridge, tmp_path: Path) -> None:
    state = build_state()
    source, ctl, _ports = setup(dummy_ovs, tmp_path, state)
    try:
        # Another table's Flow_Table row (an operator's): the agent's write must leave it alone.
        dummy_ovs.vsctl("--", "set", "Bridge", "br0", "flow_tables:0=@t", "--", "--id=@t", "create",
                        "Flow_Table", "name=operator")
        spec = BridgeSpec(1, "0a:00:00:00:00:01", (f"unix:{tmp_path / 'ctl.sock'}",), datapath_type="dummy",
                          affinity_flow_limit=LIMIT)
        assert bridge.ensure(spec)
        row = dummy_ovs.vsctl("--columns=name,flow_limit,overflow_policy,groups", "list", "Flow_Table", "AFFINITY")
        assert re.search(r"flow_limit\s*: 40\b", row) and re.search(r"overflow_policy\s*: evict\b", row), row
        until(lambda: advertised_limit(dummy_ovs) == LIMIT, "ovs-vswitchd to apply the row")
        tables = dummy_ovs.vsctl("get", "Bridge", "br0", "flow_tables")
        assert tables.startswith("{0=") and ", 7=" in tables, tables
        # A second agent pass writes nothing to it: the row's _version (changed by any write) stays.
        before = versions(dummy_ovs)
        assert not bridge._ensure_affinity_table(spec)
        bridge.ensure(spec)  # the whole pass (a Controller row may still get its max_backoff: not ours)
        assert versions(dummy_ovs) == before

        source.wait_realized("h1", timeout=20)
        assert affinity(dummy_ovs) == []  # the controller programs nothing here: only learned flows
        pinned = {f for f in dummy_ovs.dump_flows("br0") if f", table={AFFINITY_TABLE}, " not in f}
        assert pinned

        # Two connections E and F learned; the flood fills the table up to the limit.
        dummy_ovs.appctl("netdev-dummy/receive", "br0", frame(dummy_ovs, CLIENT, 50000),
                         frame(dummy_ovs, CLIENT, 50001))
        until(lambda: has_conn(dummy_ovs, CLIENT, 50000) and has_conn(dummy_ovs, CLIENT, 50001), "E and F learned")
        peak: list[int] = []
        flood(dummy_ovs, range(20000, 20000 + LIMIT - 2), peak)
        assert len(affinity(dummy_ovs)) == LIMIT
        assert all("idle_timeout=" in f for f in affinity(dummy_ovs))  # all evictable

        # E keeps talking (an ACK, which follows its learned flow), F stays quiet. OVS ranks by expiry
        # in ~1 s steps and re-ranks once a second: E's last packet must be seconds newer than the
        # flood's SYNs. Time passing is the mechanism here, not a readiness wait.
        time.sleep(2.2)
        dummy_ovs.appctl("netdev-dummy/receive", "br0", frame(dummy_ovs, CLIENT, 50000, flags=ACK))
        until(lambda: any("tp_src=50000," in f and "n_packets=1," in f for f in affinity(dummy_ovs)),
              "E's flow credited with its ACK (n_packets 1)")
        time.sleep(1.2)  # one re-ranking round

        # LIMIT - 1 more new connections: exactly the flood's first wave and F expire before E.
        flood(dummy_ovs, range(30000, 30000 + LIMIT - 1), peak)
        assert max(peak) <= LIMIT, peak
        flows = affinity(dummy_ovs)
        assert len(flows) == LIMIT
        assert has_conn(dummy_ovs, CLIENT, 50000), "E (refreshed by traffic) was evicted"
        assert not has_conn(dummy_ovs, CLIENT, 50001), "F (idle) survived: nothing was evicted by age"
        assert not any(has_conn(dummy_ovs, FLOOD, s) for s in range(20000, 20000 + LIMIT - 2))
        assert all(has_conn(dummy_ovs, FLOOD, s) for s in range(30000, 30000 + LIMIT - 1))

        # Positive control: a NEW connection after the flood is still learned, the table stays at the cap.
        dummy_ovs.appctl("netdev-dummy/receive", "br0", frame(dummy_ovs, CLIENT, 50002))
        until(lambda: has_conn(dummy_ovs, CLIENT, 50002), "a new connection learned into a full table")
        assert len(affinity(dummy_ovs)) == LIMIT
        # The controller's flows in the other tables were not touched by eviction.
        assert {f for f in dummy_ovs.dump_flows("br0") if f", table={AFFINITY_TABLE}, " not in f} == pinned

        # A lower limit through the same spec field: OVS evicts down to it at once.
        assert bridge._ensure_affinity_table(BridgeSpec(1, spec.hwaddr, spec.controllers, "dummy",
                                                        affinity_flow_limit=LIMIT // 2))
        until(lambda: len(affinity(dummy_ovs)) <= LIMIT // 2, f"the table shrunk to {LIMIT // 2}")
        assert len(affinity(dummy_ovs)) == LIMIT // 2
        # Drift: someone changes the row; the agent's pass puts it back.
        dummy_ovs.vsctl("set", "Flow_Table", "AFFINITY", "overflow_policy=refuse", "flow_limit=7")
        until(lambda: list(bridge._bridge_row("br0").flow_tables[AFFINITY_TABLE].flow_limit) == [7],
              "the agent's IDL to see the change")
        assert bridge.ensure(spec)
        assert "operator" in dummy_ovs.vsctl("list", "Flow_Table")
        row = dummy_ovs.vsctl("--columns=flow_limit,overflow_policy", "list", "Flow_Table", "AFFINITY")
        assert re.search(r"flow_limit\s*: 40\b", row) and "evict" in row, row
    finally:
        ctl.stop()


def test_without_the_row_a_flood_grows_the_table(dummy_ovs: DummyOVS, bridge: Bridge, tmp_path: Path) -> None:
    """The control: the same flood on a switch without the agent's Flow_Table row is not capped. Then
    the upgrade path: the row written onto a switch that already holds learned flows keeps them all."""
    source, ctl, _ports = setup(dummy_ovs, tmp_path, build_state())
    try:
        source.wait_realized("h1", timeout=20)
        peak: list[int] = []
        flood(dummy_ovs, range(20000, 20000 + 2 * LIMIT), peak)
        assert len(affinity(dummy_ovs)) == 2 * LIMIT
        spec = BridgeSpec(1, "0a:00:00:00:00:01", (f"unix:{tmp_path / 'ctl.sock'}",), datapath_type="dummy",
                          affinity_flow_limit=3 * LIMIT)
        assert bridge.ensure(spec)
        until(lambda: advertised_limit(dummy_ovs) == 3 * LIMIT, "ovs-vswitchd to apply the row")
        assert len(affinity(dummy_ovs)) == 2 * LIMIT
    finally:
        ctl.stop()
