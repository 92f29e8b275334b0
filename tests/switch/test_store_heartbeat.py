"""Schema 1.9.0: the agents' leases (Host.heartbeat, a counter; Host.datapath, what the agent runs).

On a real ovsdb-server: a 1.8.0 database is converted in place and its hosts read with no beat and no
datapath; a beat through either agent view (OVS: ``host=``; eBPF: a whole view with ``reports=False``)
reaches the API's view and its heartbeat watchers, bumps no generation, and wakes neither another
agent's view nor the controller's reader (a beat every second must cost them nothing).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from portmesh.model.entities import Host, HostStatus
from portmesh.store.client import Store
from portmesh.store.reader import StateReader
from tests.switch.old_schemas import older_schema, upgraded_store
from tests.switch.test_store import container, server
from tests.switch.test_store_mirror import wait_until

__all__ = ["server"]  # the fixture, re-used

pytestmark = pytest.mark.switch


def test_a_1_8_0_database_is_upgraded_in_place_and_its_hosts_have_not_beaten(tmp_path: Path) -> None:
    with upgraded_store(tmp_path, older_schema(tmp_path, "1.8.0", "heartbeat", "datapath")) as store:
        hs = store.host_status("h1")
        assert (hs.heartbeat, hs.datapath) == (0, None)
        store.report_heartbeat("h1", 5, "ebpf")  # the new columns take a beat
        wait_until(lambda: (store.host_status("h1").heartbeat, store.host_status("h1").datapath) == (5, "ebpf"))


def test_beats_reach_the_api_and_wake_no_agent_nor_the_controller(server: str) -> None:
    with Store(server, timeout=10) as api:
        api.add_host(Host("h1", 1))
        api.add_host(Host("h2", 2))
        api.add_container(container("a1", "h1", block=32768))
        generation = api.snapshot().generation
        beats: list[tuple[str, int]] = []
        api.watch_heartbeats(lambda host, beat: beats.append((host, beat)))
        with (
            Store(server, timeout=10, host="h1", reports=False) as ovs_agent,
            Store(server, timeout=10, reports=False) as ebpf_agent,
            StateReader(server, timeout=10) as controller,
        ):
            woken = {"ovs agent": threading.Event(), "ebpf agent": threading.Event(), "controller": threading.Event()}
            ovs_agent.subscribe(woken["ovs agent"].set)
            ebpf_agent.subscribe(woken["ebpf agent"].set)
            controller.subscribe(woken["controller"].set)
            wait_until(lambda: "a1" in ovs_agent.snapshot().containers and "a1" in ebpf_agent.snapshot().containers)
            wait_until(lambda: "a1" in controller.snapshot().containers)
            time.sleep(0.2)  # the initial loads' notices are out
            for event in woken.values():
                event.clear()
            for beat in range(1, 6):
                ovs_agent.report_heartbeat("h1", beat, "ovs")
                ebpf_agent.report_heartbeat("h2", 100 + beat, "ebpf")
            wait_until(lambda: ("h1", 5) in beats and ("h2", 105) in beats)
            assert api.host_status("h1") == HostStatus(heartbeat=5, datapath="ovs")
            assert api.host_status("h2") == HostStatus(heartbeat=105, datapath="ebpf")
            assert [b for h, b in beats if h == "h1"] == [1, 2, 3, 4, 5]  # every beat, as it arrived
            time.sleep(0.3)  # a notice would have come by now
            assert not any(event.is_set() for event in woken.values()), [k for k, e in woken.items() if e.is_set()]
            assert api.snapshot().generation == generation  # a report, not a change of the desired state
            api.add_container(container("a2", "h1", block=33792))  # positive control: a desired change wakes all
            for name, event in woken.items():
                assert event.wait(10), name
