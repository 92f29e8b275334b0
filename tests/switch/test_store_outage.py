"""The controller outlives a store outage: failed reads and failed reports are retried, flows stay exact."""

from __future__ import annotations

import threading
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

from portmesh.lab.dummy_ovs import DummyOVS
from portmesh.model.config import DEFAULT_CONFIG as CFG
from portmesh.model.entities import DesiredState, MappingKey, Proto
from portmesh.model.validation import new_mapping
from tests.switch.conftest import ControllerThread, MemoryState
from tests.switch.test_pipeline_trace import IP10, build_state, last_actions


class FlakyState(MemoryState):
    """Reads fail while ``reads_down`` is set, reports while ``reports_down`` is, as an unreachable store's would."""

    def __init__(self, state: DesiredState) -> None:
        super().__init__(state)
        self.reads_down = threading.Event()
        self.reports_down = threading.Event()
        self.failed_reads = 0
        self.failed_reports = 0

    def snapshot(self) -> DesiredState:
        if self.reads_down.is_set():
            self.failed_reads += 1
            raise ConnectionError("store unreachable (test)")
        return super().snapshot()

    def report_switch(self, host: str, generation: int, connected: bool, waiting: Collection[str] = ()) -> None:
        if self.reports_down.is_set():
            self.failed_reports += 1
            raise ConnectionError("store unreachable (test)")
        super().report_switch(host, generation, connected, waiting)


def test_controller_retries_reads_and_reports_after_a_store_outage(dummy_ovs: DummyOVS, tmp_path: Path) -> None:
    state = build_state()
    source = FlakyState(state)
    ctl = ControllerThread(source, tmp_path / "ctl.sock").start()
    try:
        dummy_ovs.add_bridge("br0", 1, f"unix:{tmp_path / 'ctl.sock'}")
        for i, c in enumerate(sorted(state.containers.values(), key=lambda c: c.name), start=1):
            dummy_ovs.add_port("br0", c.port_name, i)
        source.publish(state)
        source.wait_realized("h1")

        # A change arrives while the store cannot be read: the reads fail and are retried (the
        # loop that serves the switch survives); once the store is back the change goes in.
        pause = threading.Event()
        extra = new_mapping(state, MappingKey(IP10, Proto.TCP, 8443), "web1")
        source.reads_down.set()
        generation = source.publish(replace(state, mappings={**state.mappings, extra.key: extra}))
        pause.wait(2.5)
        assert source.failed_reads >= 2, "the controller should have retried the read"
        source.reads_down.clear()
        source.wait_realized("h1", generation, timeout=10)

        # Now only the report fails, after the flows are in: it is retried, no flow is sent again.
        assert ctl.controller is not None
        source.reports_down.set()
        third = new_mapping(state, MappingKey(IP10, Proto.TCP, 9443), "web1")
        gen2 = source.publish(replace(state, mappings={**state.mappings, extra.key: extra, third.key: third}))
        pause.wait(2.5)
        assert source.failed_reports >= 2, "the controller should have retried the report"
        mods = ctl.controller.flow_mods
        source.reports_down.clear()
        source.wait_realized("h1", gen2, timeout=10)
        assert ctl.controller.flow_mods == mods, "retrying a report must not resend flows"
        web1 = state.containers["web1"]
        for port in (8443, 9443):
            out = dummy_ovs.trace("br0", f"in_port=LOCAL,dl_dst={CFG.virtual_mac},tcp,nw_src=198.51.100.2,"
                                  f"nw_dst={IP10},tp_src=40000,tp_dst={port}")
            assert f"set(eth(dst={web1.mac}))" in last_actions(out), out
    finally:
        ctl.stop()
