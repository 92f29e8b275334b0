"""Two controllers on a 3-member Raft store, started as the lab's ``--ha`` starts them
(``--store tcp:...,tcp:...,tcp:...``): kill -9 of the controller master, then of the store's
leader. Exactly one master after each, no flow-mods, the flows unchanged, and a change
through the store still reaches the switches (positive control).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from portmesh.lab.dummy_ovs import DummyOVS
from portmesh.model.entities import MappingKey, Proto
from portmesh.model.validation import new_mapping
from portmesh.store.client import Store
from portmesh.store.server import start_server, stop_server
from tests.switch.test_controller_ha_process import (
    BRIDGES,
    IP,
    Instance,
    build_state,
    flows,
    is_master,
    is_slave,
    realised,
    wait_for,
)
from tests.switch.test_store import _free_port, _role, make_cluster_dbs

pytestmark = pytest.mark.switch


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[str, dict[int, int]]]:
    """Three members, each serving clients on its own TCP port: the client remote list and member -> PID."""
    if subprocess.run(["which", "ovsdb-server"], capture_output=True).returncode:
        pytest.skip("ovsdb-server not installed")
    dbs = make_cluster_dbs(tmp_path)
    pids: dict[int, int] = {}
    tcps = [f"127.0.0.1:{_free_port()}" for _ in range(3)]
    try:
        for i in range(3):
            pids[i] = start_server(dbs[i], tmp_path / f"m{i}.sock", tcp=tcps[i], create=False)
        yield ",".join(f"tcp:{t}" for t in tcps), pids
    finally:
        for pid in pids.values():
            stop_server(pid)


def one_master(a: Instance, b: Instance) -> bool:
    return {a.metric("portmesh_controller_is_master"), b.metric("portmesh_controller_is_master")} == {0.0, 1.0}


def test_controller_and_store_leader_kills_on_a_raft_store(
    cluster: tuple[str, dict[int, int]], tmp_path: Path
) -> None:
    remote, pids = cluster
    ovs = DummyOVS(tmp_path / "ovs")
    (tmp_path / "ovs").mkdir()
    c1 = Instance("c1", remote, tmp_path)
    c2 = Instance("c2", remote, tmp_path)
    try:
        ovs.start()
        with Store(remote, timeout=15) as store:
            state = build_state()
            for host in state.hosts.values():
                store.add_host(host)
            for c in state.containers.values():
                store.add_container(c, [m for m in state.mappings.values() if m.container == c.name])
            c1.start()
            wait_for(lambda: "became master (epoch 1)" in c1.text(), 20, "c1 master")
            c2.start()
            wait_for(lambda: "standby: c1 is master (epoch 1)" in c2.text(), 20, "c2 standby")
            for i, (bridge, dpid) in enumerate(BRIDGES.values()):
                ovs.add_bridge(bridge, dpid, c1.target)
                ovs.vsctl("set-controller", bridge, c1.target, c2.target)
                ovs.add_port(bridge, state.containers[f"web{i}"].port_name, 1)
            generation = store.snapshot().generation
            wait_for(lambda: realised(store, generation), 20, "both switches programmed")
            wait_for(lambda: is_master(ovs, c1) and is_slave(ovs, c2), 20, "OVS: c1 master, c2 slave")
            before = flows(ovs)
            assert c1.flow_mods() > 0 and c2.flow_mods() == 0

            assert c1.proc is not None
            os.kill(c1.proc.pid, signal.SIGKILL)
            killed = time.monotonic()
            c1.proc.wait()
            wait_for(lambda: c2.metric("portmesh_controller_syncs_total") >= len(BRIDGES), 5, "c2 synced every switch")
            took = time.monotonic() - killed
            print(f"\nRaft store: kill -9 controller master -> other master, every switch synced in {took:.2f} s, "
                  f"flow-mods {c2.flow_mods():.0f}")
            assert took < 2.0
            assert c2.flow_mods() == 0 and flows(ovs) == before
            c1.start()
            wait_for(lambda: "standby: c2 is master (epoch 2)" in c1.text(), 20, "restarted c1 standby")

            # Kill -9 the store's Raft leader, which both controllers are connected to.
            leader = next(i for i in range(3) if _role(tmp_path / f"m{i}.ctl") == "leader")
            pid = pids.pop(leader)
            os.kill(pid, signal.SIGKILL)
            stop_server(pid)
            killed = time.monotonic()
            # Both lose the lock with the connection; one of them wins it on the new leader.
            wait_for(lambda: "became master (epoch 3)" in c1.text() + c2.text(), 30, "a master on the new leader")
            took = time.monotonic() - killed
            master, standby = (c1, c2) if "became master (epoch 3)" in c1.text() else (c2, c1)
            wait_for(lambda: one_master(c1, c2), 10, "exactly one master")
            wait_for(lambda: is_master(ovs, master) and is_slave(ovs, standby), 20, "OVS agrees")
            print(f"Raft store: kill -9 store leader -> {master.name} master (epoch 3) after {took:.2f} s; "
                  f"flow-mods {c1.flow_mods() + c2.flow_mods():.0f}")
            assert c1.flow_mods() == 0 and c2.flow_mods() == 0
            assert flows(ovs) == before

            # Positive control: a change through the store reaches the switches via the master.
            extra = new_mapping(store.snapshot(), MappingKey(IP, Proto.UDP, 53), "web0")
            generation = store.add_mapping(extra)
            wait_for(lambda: realised(store, generation) and flows(ovs) != before, 15, "the new mapping on the switches")
            assert master.flow_mods() > 0 and standby.flow_mods() == 0
    finally:
        for instance in (c1, c2):
            instance.stop()
        ovs.stop()
