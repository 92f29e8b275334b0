"""Tier 2: AFFINITY and a SYN flood, now that connections live in conntrack (zone 2), not in learned flows.

A flood of new 5-tuples grows conntrack zone 2 (bounded by the datapath's connection limit: OVS 3.1's
schema has no CT_Zone.limit, see portmesh/agent/bridge.py) and leaves AFFINITY's flows exactly as the
controller programmed them. The agent's Flow_Table row for table 7 keeps its name only: an older
agent's cap (flow_limit + evict), which would now refuse the controller's own flows, is cleared. The
real controller programs a real dummy-datapath ovs-vswitchd; SYNs are injected with
``netdev-dummy/receive`` so the switch really runs conntrack.
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
from tests.switch.test_balancing_trace import build_state, packet
from tests.switch.test_pipeline_trace import setup

LIMIT = 40
CLIENT = "198.51.100.60"  # the established connections' client
FLOOD = "198.51.100.61"  # the flood's source (one address, a new source port per SYN)


def test_agent_table_number_is_the_controllers() -> None:
    """The agent cannot import the controller (components meet through the store): pinned here."""
    assert (Table.AFFINITY.number, Table.AFFINITY.name) == (AFFINITY_TABLE, AFFINITY_TABLE_NAME)


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
    out = ovs.ofctl("dump-flows", "--no-stats", "br0", f"table={AFFINITY_TABLE}")
    return sorted(line.strip() for line in out.splitlines() if "actions=" in line)


def conns(ovs: DummyOVS) -> set[tuple[str, int]]:
    """(client IP, client port) of every conntrack zone 2 entry."""
    found = re.findall(r"orig=\(src=([\d.]+),dst=[\d.]+,sport=(\d+),",
                       ovs.appctl("dpctl/dump-conntrack", "zone=2"))
    return {(src, int(sport)) for src, sport in found}


def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def flood(ovs: DummyOVS, sports: range) -> None:
    """SYNs from FLOOD, one new 5-tuple each, 10 per receive call."""
    frames = [frame(ovs, FLOOD, s) for s in sports]
    for i in range(0, len(frames), 10):
        ovs.appctl("netdev-dummy/receive", "br0", *frames[i:i + 10])
    until(lambda: (FLOOD, sports[-1]) in conns(ovs), f"the flood's last SYN (port {sports[-1]}) tracked")


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


def test_flood_grows_conntrack_not_affinity(dummy_ovs: DummyOVS, bridge: Bridge, tmp_path: Path) -> None:
    state = build_state()
    source, ctl, _ports = setup(dummy_ovs, tmp_path, state)
    try:
        # An older agent's cap on table 7, and another table's row (an operator's) to be left alone.
        dummy_ovs.vsctl("--", "set", "Bridge", "br0", "flow_tables:0=@t", "flow_tables:7=@a", "--", "--id=@t",
                        "create", "Flow_Table", "name=operator", "--", "--id=@a", "create", "Flow_Table",
                        "name=AFFINITY", "flow_limit=40", "overflow_policy=evict")
        until(lambda: advertised_limit(dummy_ovs) == LIMIT, "ovs-vswitchd to apply the old cap")
        spec = BridgeSpec(1, "0a:00:00:00:00:01", (f"unix:{tmp_path / 'ctl.sock'}",), datapath_type="dummy")
        assert bridge.ensure(spec)
        row = dummy_ovs.vsctl("--columns=name,flow_limit,overflow_policy", "list", "Flow_Table", "AFFINITY")
        assert re.search(r"flow_limit\s*: \[\]", row) and re.search(r"overflow_policy\s*: \[\]", row), row
        until(lambda: advertised_limit(dummy_ovs) != LIMIT, "ovs-vswitchd to drop the cap")
        tables = dummy_ovs.vsctl("get", "Bridge", "br0", "flow_tables")
        assert tables.startswith("{0=") and ", 7=" in tables, tables
        # A second agent pass writes nothing to it: the row's _version (changed by any write) stays.
        before = versions(dummy_ovs)
        assert not bridge._ensure_affinity_table(spec)
        bridge.ensure(spec)  # the whole pass (a Controller row may still get its max_backoff: not ours)
        assert versions(dummy_ovs) == before

        source.wait_realized("h1", timeout=20)
        programmed = affinity(dummy_ovs)
        assert len(programmed) == 3 + 256  # a pin per backend, 256 buckets: more than the old cap of 40

        # Two connections E and F, then a flood of 3 x the old cap: conntrack grows, AFFINITY does not.
        dummy_ovs.appctl("netdev-dummy/receive", "br0", frame(dummy_ovs, CLIENT, 50000),
                         frame(dummy_ovs, CLIENT, 50002))
        until(lambda: {(CLIENT, 50000), (CLIENT, 50002)} <= conns(dummy_ovs), "E and F tracked")
        flood(dummy_ovs, range(20000, 20000 + 3 * LIMIT))
        assert len(conns(dummy_ovs)) == 3 * LIMIT + 2
        assert affinity(dummy_ovs) == programmed
        # Positive control: a NEW connection after the flood is still tracked.
        dummy_ovs.appctl("netdev-dummy/receive", "br0", frame(dummy_ovs, CLIENT, 50004))
        until(lambda: (CLIENT, 50004) in conns(dummy_ovs), "a new connection tracked after the flood")

        # Drift: someone caps the table again; the agent's pass takes the cap away.
        dummy_ovs.vsctl("set", "Flow_Table", "AFFINITY", "overflow_policy=refuse", "flow_limit=7")
        until(lambda: list(bridge._bridge_row("br0").flow_tables[AFFINITY_TABLE].flow_limit) == [7],
              "the agent's IDL to see the change")
        assert bridge.ensure(spec)
        assert "operator" in dummy_ovs.vsctl("list", "Flow_Table")
        row = dummy_ovs.vsctl("--columns=flow_limit,overflow_policy", "list", "Flow_Table", "AFFINITY")
        assert re.search(r"flow_limit\s*: \[\]", row) and "refuse" not in row, row
    finally:
        ctl.stop()


def test_a_fresh_bridge_gets_the_named_row(dummy_ovs: DummyOVS, bridge: Bridge, tmp_path: Path) -> None:
    """No Flow_Table row yet: the agent creates AFFINITY's (name only) and OVS advertises the name."""
    _source, ctl, _ports = setup(dummy_ovs, tmp_path, build_state())
    try:
        spec = BridgeSpec(1, "0a:00:00:00:00:01", (f"unix:{tmp_path / 'ctl.sock'}",), datapath_type="dummy")
        assert bridge.ensure(spec)
        until(lambda: f'table {AFFINITY_TABLE} ("{AFFINITY_TABLE_NAME}")' in dummy_ovs.ofctl("dump-table-features", "br0"),
              "ovs-vswitchd to name table 7")
        row = dummy_ovs.vsctl("--columns=name,flow_limit", "list", "Flow_Table", "AFFINITY")
        assert re.search(r"flow_limit\s*: \[\]", row), row
    finally:
        ctl.stop()
