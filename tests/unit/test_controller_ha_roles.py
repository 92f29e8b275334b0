"""The pure pieces of controller high availability: election steps, generation-id order, which errors demote."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from portmesh.controller.connection import SwitchError
from portmesh.controller.encoding import ofp
from portmesh.controller.roles import Step, error_says_newer_master, is_stale, next_step, says_newer_master


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
