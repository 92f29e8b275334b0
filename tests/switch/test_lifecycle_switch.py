"""The controller reports a host's generation even while a container has no port (issue 10 item 1).

Before, it withheld the generation until every container of the host had a port on the
switch; a container that can never start never gets one, so that host's generation stopped
for good and every later ``--wait`` there answered 504. Now the generation is reported with
the containers still waiting for their port named, and the set shrinks as ports appear.
"""

from __future__ import annotations

from pathlib import Path

from portmesh.lab.dummy_ovs import DummyOVS
from tests.switch.conftest import ControllerThread, MemoryState
from tests.switch.test_pipeline_trace import build_state


def test_generation_is_reported_naming_the_containers_without_a_port(dummy_ovs: DummyOVS, tmp_path: Path) -> None:
    state = build_state()
    source = MemoryState(state)
    ctl = ControllerThread(source, tmp_path / "ctl.sock").start()
    try:
        dummy_ovs.add_bridge("br0", 1, f"unix:{tmp_path / 'ctl.sock'}")
        names = sorted(state.containers)
        broken = names[-1]  # its port never appears: it cannot start
        for i, name in enumerate(names[:-1], start=1):
            dummy_ovs.add_port("br0", state.containers[name].port_name, i)
        generation = source.publish(state)

        def reported(waiting: frozenset[str]) -> bool:
            return source.reports.get("h1", (-1, False)) == (generation, True) and source.waiting.get("h1") == waiting

        with source._cond:
            assert source._cond.wait_for(lambda: reported(frozenset({broken})), 10), (source.reports, source.waiting)
        # Positive control: once its port appears, the same generation is reported with nothing waiting.
        dummy_ovs.add_port("br0", state.containers[broken].port_name, len(names))
        with source._cond:
            assert source._cond.wait_for(lambda: reported(frozenset()), 10), (source.reports, source.waiting)
    finally:
        ctl.stop()


def test_state_reader_reports_the_waiting_set_through_a_real_store(tmp_path: Path) -> None:
    """The controller's StateReader writes switch_waiting; the IDL client (the API's view) reads it back."""
    from portmesh.model.entities import Host, HostStatus
    from portmesh.store.client import Store
    from portmesh.store.reader import StateReader
    from portmesh.store.server import start_server, stop_server
    from tests.switch.test_store_mirror import wait_until

    pid = start_server(tmp_path / "store.db", tmp_path / "store.sock")
    remote = f"unix:{tmp_path / 'store.sock'}"
    try:
        with Store(remote, timeout=5) as store, StateReader(remote, timeout=5) as reader:
            generation = store.add_host(Host("h1", 1))
            reader.report_switch("h1", generation, True, {"web", "db"})
            wait_until(lambda: store.host_status("h1").switch_waiting == frozenset({"web", "db"}))
            reader.report_switch("h1", generation, True)  # positive control: the set empties again
            wait_until(lambda: store.host_status("h1") == HostStatus(generation, 0, True, frozenset()))
    finally:
        stop_server(pid)
