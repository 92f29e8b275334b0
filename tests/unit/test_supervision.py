"""Supervision (issue 13 item 7): a controller whose main task dies says why, so its process exits non-zero.

The seam is ``supervise``: ``serve`` hands it the converge loop and the stop event and exits
with status 1 when it returns a reason (after letting the switches go).
"""

from __future__ import annotations

import asyncio

from portmesh.controller.__main__ import supervise


async def _dies() -> None:
    await asyncio.sleep(0.01)
    raise RuntimeError("store schema changed under us")


async def _forever() -> None:
    await asyncio.Event().wait()


async def _returns() -> None:
    return None


def test_a_dying_main_task_is_a_reason_to_exit() -> None:
    why = asyncio.run(supervise(_dies(), asyncio.Event()))
    assert why is not None and "RuntimeError" in why and "store schema changed" in why


def test_a_main_task_that_returns_is_a_reason_to_exit() -> None:
    assert asyncio.run(supervise(_returns(), asyncio.Event())) == "main task ended"


def test_a_requested_stop_is_no_failure() -> None:
    """Positive control: the same loop, stopped on purpose, is a clean exit (None) and the task is cancelled."""

    async def scenario() -> tuple[str | None, bool]:
        stop = asyncio.Event()
        task = asyncio.ensure_future(_forever())
        asyncio.get_running_loop().call_later(0.05, stop.set)
        why = await supervise(task, stop)
        await asyncio.sleep(0)
        return why, task.cancelled()

    why, cancelled = asyncio.run(scenario())
    assert why is None and cancelled


def test_a_listener_that_stops_serving_is_a_reason_to_exit() -> None:
    serving = [True]

    async def scenario() -> str | None:
        asyncio.get_running_loop().call_later(0.05, serving.__setitem__, 0, False)
        return await supervise(_forever(), asyncio.Event(), lambda: serving[0])

    assert asyncio.run(scenario()) == "the switch listener stopped serving"
