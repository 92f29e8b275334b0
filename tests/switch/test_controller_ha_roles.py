"""A stale master against a real switch: OVS's answers (IS_SLAVE, STALE) make it go quiet.

Two in-process controllers on one real ovs-vswitchd (dummy datapath), each with its own
fake lock, so the test decides who believes what: this is the frozen master that wakes
up still believing it holds the lock, made deterministic. After the other one claims
MASTER with a newer generation id, OVS turns the old one into a slave: its next write is
refused (OFPBRC_IS_SLAVE) and a fresh MASTER request with its old id is refused as stale
(OFPRRFC_STALE); each time it demotes itself, sends no flow-mod, and the flows are the
new master's. The new master's write of the same change is the positive control.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from portmesh.controller.service import Controller
from portmesh.lab.dummy_ovs import DummyOVS
from portmesh.model.entities import MappingKey, Proto
from portmesh.model.validation import new_mapping
from tests.switch.conftest import ControllerThread, MemoryState
from tests.switch.test_pipeline_trace import IP11, build_state
from tests.unit.test_controller_ha_roles import FakeElection

pytestmark = pytest.mark.switch


class ElectedControllerThread(ControllerThread):
    """The test controller with an election (a fake lock the test switches)."""

    def __init__(self, source: MemoryState, socket_path: Path, election: FakeElection, name: str) -> None:
        super().__init__(source, socket_path)
        self.election = election
        self.name = name

    async def _start(self) -> None:
        self.controller = Controller(self.source, election=self.election, name=self.name)
        self.controller.attach()
        self._server = await asyncio.start_unix_server(self.controller.handle_switch, str(self.path))
        self._task = asyncio.create_task(self.controller.run())

    @property
    def ctl(self) -> Controller:
        assert self.controller is not None
        return self.controller

    def set(self, **kwargs: object) -> None:
        """Switch the fake lock from the controller's own loop (its callbacks hop there anyway)."""
        self.loop.call_soon_threadsafe(lambda: self.election.set(**kwargs))  # type: ignore[arg-type]


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.01)


def roles(ovs: DummyOVS) -> dict[str, str]:
    out = json.loads(ovs.vsctl("--format=json", "--columns=target,role", "list", "controller"))
    return {target: role if isinstance(role, str) else "" for target, role in out["data"]}


async def _believe(ctl: Controller, epoch: int) -> None:
    """Make ``ctl`` think it is master at ``epoch`` again (on its own loop); its switches must be re-asked."""
    ctl.master, ctl.epoch = True, epoch
    for switch in ctl.switches.values():
        switch.role_epoch = -1


def test_a_stale_master_is_refused_by_the_switch_and_goes_quiet(
    dummy_ovs: DummyOVS, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="portmesh.controller.service")
    state = build_state()
    source = MemoryState(state)
    a = ElectedControllerThread(source, tmp_path / "a.sock", FakeElection(), "a")
    b = ElectedControllerThread(source, tmp_path / "b.sock", FakeElection(), "b")
    a.start()
    b.start()
    try:
        a.set(held=True)
        wait_for(lambda: a.ctl.master and a.ctl.epoch == 1, 10, "a master at epoch 1")
        b.set(epoch=1, master="a")
        dummy_ovs.add_bridge("br0", 1, f"unix:{a.path}")
        dummy_ovs.vsctl("set-controller", "br0", f"unix:{a.path}", f"unix:{b.path}")
        for i, c in enumerate(sorted(state.containers.values(), key=lambda c: c.name), start=1):
            dummy_ovs.add_port("br0", c.port_name, i)
        generation = source.publish(state)
        source.wait_realized("h1", generation)
        wait_for(lambda: roles(dummy_ovs) == {f"unix:{a.path}": "master", f"unix:{b.path}": "slave"}, 20,
                 "OVS: a master, b slave")
        a_mods = a.ctl.flow_mods
        assert a_mods > 0 and b.ctl.flow_mods == 0
        before = sorted(dummy_ovs.dump_flows("br0"))

        # b takes over with epoch 2, while a (the "frozen" one) still believes it holds the lock.
        b.set(held=True)
        wait_for(lambda: b.ctl.master and [s.role_epoch for s in b.ctl.switches.values()] == [2], 10,
                 "b MASTER(2) on the switch")
        wait_for(lambda: b.ctl.syncs >= 1, 10, "b synced the switch")
        assert b.ctl.flow_mods == 0 and sorted(dummy_ovs.dump_flows("br0")) == before
        assert a.ctl.master  # a has not noticed anything: nothing told it yet

        # A change: both try to write it. The switch refuses a's (IS_SLAVE): a demotes itself.
        extra = new_mapping(state, MappingKey(IP11, Proto.TCP, 8443), "web3")
        changed = replace(state, mappings={**state.mappings, extra.key: extra})
        generation = source.publish(changed)
        wait_for(lambda: not a.ctl.master, 10, "a demoted by the switch's IS_SLAVE")
        assert "refused a write: a newer master exists" in caplog.text
        source.wait_realized("h1", generation)
        assert b.ctl.flow_mods > 0  # positive control: the same change went in through b
        assert a.ctl.flow_mods == a_mods
        after = sorted(dummy_ovs.dump_flows("br0"))
        assert after != before

        # a believes again it is master at epoch 1 (as a frozen master would when its switch
        # connection, not just a write, is new): the switch answers its MASTER(1) with STALE.
        a.call(_believe(a.ctl, 1)).result(5)
        dummy_ovs.vsctl("set-controller", "br0", f"unix:{b.path}")  # drop a's connection ...
        wait_for(lambda: not a.ctl.switches, 10, "a's connection gone")
        dummy_ovs.vsctl("set-controller", "br0", f"unix:{a.path}", f"unix:{b.path}")  # ... and make a new one
        wait_for(lambda: not a.ctl.master, 10, "a demoted by the switch's STALE")
        assert "refused MASTER(1): a newer master exists" in caplog.text
        wait_for(lambda: len(a.ctl.switches) == 1, 10, "a connected again, as a standby")
        time.sleep(0.5)  # give a wrongly active ``a`` the time to write something
        assert a.ctl.flow_mods == a_mods
        assert sorted(dummy_ovs.dump_flows("br0")) == after
        wait_for(lambda: roles(dummy_ovs).get(f"unix:{b.path}") == "master", 20, "OVS: b still master")
    finally:
        a.stop()
        b.stop()


def test_a_master_whose_store_went_back_moves_its_epoch_past_the_switch(dummy_ovs: DummyOVS, tmp_path: Path) -> None:
    """The switch has seen generation id 50 (from a store since restored to an older copy: epoch 0).
    The new master's MASTER(1) is refused as stale; holding the lock, it asks the switch which id it
    has seen (a NOCHANGE role request), claims epoch 51 and is master: no loop of refusals, 0 flow-mods."""
    state = build_state()
    source = MemoryState(state)
    old = ElectedControllerThread(source, tmp_path / "old.sock", FakeElection(), "old")
    old.start()
    new: ElectedControllerThread | None = None
    try:
        old.election.epoch = 49
        old.set(held=True)
        wait_for(lambda: old.ctl.master and old.ctl.epoch == 50, 10, "the old master at epoch 50")
        dummy_ovs.add_bridge("br0", 1, f"unix:{old.path}")
        for i, c in enumerate(sorted(state.containers.values(), key=lambda c: c.name), start=1):
            dummy_ovs.add_port("br0", c.port_name, i)
        generation = source.publish(state)
        source.wait_realized("h1", generation)
        assert old.ctl.flow_mods > 0
        before = sorted(dummy_ovs.dump_flows("br0"))
        old.stop()

        new = ElectedControllerThread(source, tmp_path / "new.sock", FakeElection(), "new")  # its store: epoch 0
        new.start()
        new.set(held=True)
        dummy_ovs.vsctl("set-controller", "br0", f"unix:{new.path}")
        ctl = new.ctl
        wait_for(lambda: ctl.master and [s.role_epoch for s in ctl.switches.values()] == [51], 10,
                 "the new master at epoch 51 on the switch")
        wait_for(lambda: ctl.syncs >= 1, 10, "the switch synced")
        assert ctl.flow_mods == 0
        assert sorted(dummy_ovs.dump_flows("br0")) == before
        assert new.election.epoch == 51  # claimed once past the switch's id, not 50 claims in a row
    finally:
        if new is not None:
            new.stop()
        if old._thread.is_alive():
            old.stop()
