"""The pure pieces of controller high availability: election steps, generation-id order, which errors demote."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from portmesh.controller.connection import SwitchError
from portmesh.controller.encoding import ofp
from portmesh.controller.roles import Step, error_says_newer_master, is_stale, next_step, says_newer_master
from portmesh.controller.service import Controller
from portmesh.store.engine import StoreError
from tests.unit.fakes import FakeStore


@pytest.mark.parametrize(
    ("is_master", "lock_held", "step"),
    [(False, True, Step.CLAIM), (True, False, Step.RESIGN), (True, True, Step.STAY), (False, False, Step.STAY)],
)
def test_next_step(is_master: bool, lock_held: bool, step: Step) -> None:
    assert next_step(is_master, lock_held) is step


def test_generation_ids_compare_as_the_switch_does() -> None:
    assert is_stale(4, 5)
    assert not is_stale(5, 5)  # equal is accepted (a SLAVE at the master's epoch)
    assert not is_stale(6, 5)
    # A signed 64-bit difference: a wrapped id is newer than one just below the wrap.
    assert not is_stale(1, 2**64 - 1)
    assert is_stale(2**64 - 1, 1)


def test_stale_and_is_slave_mean_a_newer_master_other_errors_do_not() -> None:
    stale = SwitchError("stale", ofp.OFPET_ROLE_REQUEST_FAILED, ofp.OFPRRFC_STALE)
    slave = SwitchError("slave", ofp.OFPET_BAD_REQUEST, ofp.OFPBRC_IS_SLAVE)
    other = SwitchError("bad", ofp.OFPET_BAD_REQUEST, ofp.OFPBRC_BAD_TYPE)
    assert says_newer_master(stale) and says_newer_master(slave)
    assert not says_newer_master(other)
    assert not says_newer_master(ConnectionError("gone"))
    assert error_says_newer_master(SimpleNamespace(type=ofp.OFPET_BAD_REQUEST, code=ofp.OFPBRC_IS_SLAVE))
    assert not error_says_newer_master(SimpleNamespace(type=ofp.OFPET_BAD_REQUEST, code=ofp.OFPBRC_BAD_TYPE))


class FakeElection:
    """The store's lock as the controller sees it, switched by the test."""

    def __init__(self) -> None:
        self.held = False
        self.epoch = 0
        self.master = ""
        self.relinquished = 0
        self.refuse_claims = False
        self._callbacks: list[Callable[[], None]] = []

    def on_election(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def lock_held(self) -> bool:
        return self.held

    def leader(self) -> tuple[int, str]:
        return self.epoch, self.master

    def claim_epoch(self, name: str, above: int = 0) -> int:
        if self.refuse_claims or not self.held:
            raise StoreError("not owner")
        self.epoch = max(self.epoch, above) + 1
        self.master = name
        return self.epoch

    def relinquish(self) -> None:
        self.relinquished += 1
        self.set(held=False)

    def set(self, *, held: bool | None = None, epoch: int | None = None, master: str | None = None) -> None:
        self.held = self.held if held is None else held
        self.epoch = self.epoch if epoch is None else epoch
        self.master = self.master if master is None else master
        for cb in self._callbacks:
            cb()


def _controller(election: FakeElection) -> Controller:
    return Controller(FakeStore(), election=election, name="me")


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0.01)


def test_the_lock_makes_a_master_with_a_fresh_epoch_and_losing_it_a_standby(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="portmesh.controller.service")

    async def scenario() -> list[tuple[bool, int, float]]:
        election = FakeElection()
        ctl = _controller(election)
        ctl.attach()
        task = asyncio.ensure_future(ctl._follow_election())
        seen = []
        try:
            election.set(epoch=4, master="other")  # someone else is master: we stay standby
            await _settle()
            seen.append((ctl.master, ctl.epoch, ctl.metrics.is_master._value.get()))
            election.set(held=True)  # the lock is ours: claim epoch 5
            await _settle()
            seen.append((ctl.master, ctl.epoch, ctl.metrics.is_master._value.get()))
            election.set(held=False)  # lost (stolen, or the store session dropped): standby at once
            await _settle()
            seen.append((ctl.master, ctl.epoch, ctl.metrics.is_master._value.get()))
        finally:
            task.cancel()
        return seen

    assert asyncio.run(scenario()) == [(False, 0, 0.0), (True, 5, 1.0), (False, 5, 0.0)]
    text = caplog.text
    assert "standby: other is master (epoch 4)" in text
    assert "became master (epoch 5)" in text
    assert "became standby: lost the store lock" in text


def test_a_claim_the_store_refuses_makes_no_master() -> None:
    async def scenario() -> bool:
        election = FakeElection()
        election.refuse_claims = True
        ctl = _controller(election)
        ctl.attach()
        task = asyncio.ensure_future(ctl._follow_election())
        try:
            election.set(held=True)
            await _settle()
            return ctl.master
        finally:
            task.cancel()

    assert asyncio.run(scenario()) is False


def test_a_switch_that_knows_a_newer_master_demotes_and_gives_the_lock_up() -> None:
    async def scenario() -> tuple[bool, int]:
        election = FakeElection()
        ctl = _controller(election)
        ctl.attach()
        task = asyncio.ensure_future(ctl._follow_election())
        try:
            election.set(held=True)
            await _settle()
            assert ctl.master  # positive control
            ctl.demote("switch 1 refused MASTER(1): a newer master exists")
            await _settle()
            return ctl.master, election.relinquished
        finally:
            task.cancel()

    assert asyncio.run(scenario()) == (False, 1)


def test_without_an_election_the_controller_is_master_and_asks_no_role() -> None:
    ctl = Controller(FakeStore())
    assert ctl.master and ctl.election is None
