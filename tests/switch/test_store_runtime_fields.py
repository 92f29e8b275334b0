"""The runtime fields (env, restart, stop_timeout; exit code, restart count, runtime kind) through a real
ovsdb-server: written by the IDL client, read back by it, by the agent's table-limited view and by the
controller's StateReader (which decodes the monitor's JSON itself, column kinds from the schema)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from portmesh.model.entities import Container, ContainerStatus, Host, PortBlock, RestartPolicy, RunState
from portmesh.store.client import Store
from portmesh.store.reader import StateReader
from tests.switch.test_store_mirror import server

__all__ = ["server"]  # the fixture, re-used

pytestmark = pytest.mark.switch


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not seen in time"
        time.sleep(0.02)


def caught_up(view: Store | StateReader, generation: int) -> bool:
    return view.snapshot().generation >= generation


@pytest.fixture
def stores(server: tuple[Path, Path, list[int]]) -> Iterator[tuple[Store, Store, StateReader]]:
    _, sock, _ = server
    with (
        Store(f"unix:{sock}", timeout=5) as writer,
        Store(f"unix:{sock}", timeout=5, tables=("Global", "Host", "Container")) as agent,
        StateReader(f"unix:{sock}", timeout=5) as reader,
    ):
        yield writer, agent, reader


def test_desired_fields_round_trip_to_every_reader(stores: tuple[Store, Store, StateReader]) -> None:
    writer, agent, reader = stores
    writer.add_host(Host("h1", 1))
    ip = IPv4Address("203.0.113.5")
    c = Container(
        "app",
        "h1",
        "02:00:00:00:00:05",
        (ip,),
        PortBlock(32768, 1024),
        ("sh", "-c", "env"),
        None,
        ("A=1", "B=x=y", "EMPTY=", "U=é ☃"),
        RestartPolicy.ON_FAILURE,
        3,
    )
    plain = Container("plain", "h1", "02:00:00:00:00:06", (ip,), PortBlock(33792, 1024))
    writer.add_container(c)
    generation = writer.add_container(plain)
    views: list[Store | StateReader] = [writer, agent, reader]
    for view in views:
        wait_for(functools.partial(caught_up, view, generation))
        state = view.snapshot()
        assert state.containers["app"] == c, type(view).__name__
        assert state.containers["plain"] == plain  # defaults: no env, restart no, 10 s
        assert plain.restart == RestartPolicy.NO and plain.stop_timeout == 10

    # stop --time: the timeout is written with the run state, in one transaction (one generation).
    before = writer.snapshot().generation
    after = writer.set_container_running("app", False, stop_timeout=0)
    assert after == before + 1
    wait_for(lambda: agent.snapshot().generation >= after)
    assert agent.snapshot().containers["app"].stop_timeout == 0 and not agent.container_running("app")
    # The same stop again changes nothing and bumps nothing.
    assert writer.set_container_running("app", False, stop_timeout=0) == after


def test_status_fields_round_trip(stores: tuple[Store, Store, StateReader]) -> None:
    writer, agent, _ = stores
    writer.add_host(Host("h1", 1))
    writer.add_container(Container("app", "h1", "02:00:00:00:00:05", (IPv4Address("203.0.113.5"),), PortBlock(32768, 1024)))
    exited = ContainerStatus(RunState.EXITED, "pm-c-app", None, "exited (code 137)", "/x.log", 137, 4, "light")
    agent.report_container_status("app", exited)
    wait_for(lambda: writer.container_status("app") == exited)
    running = ContainerStatus(RunState.RUNNING, "/proc/42/ns/net", 42, "", "", None, 0, "image")
    agent.report_container_status("app", running)
    wait_for(lambda: writer.container_status("app") == running)


def test_start_of_an_exited_container_counts_in_starts(stores: tuple[Store, Store, StateReader]) -> None:
    """``docker start`` of an exited container: desired "running" already, so the start is counted."""
    writer, agent, _ = stores
    writer.add_host(Host("h1", 1))
    writer.add_container(Container("app", "h1", "02:00:00:00:00:05", (IPv4Address("203.0.113.5"),), PortBlock(32768, 1024)))
    agent.report_container_status("app", ContainerStatus(RunState.RUNNING, "ns", 7, runtime="light"))
    wait_for(lambda: writer.container_status("app") is not None)
    generation = writer.snapshot().generation
    assert writer.set_container_running("app", True) == generation  # running: nothing written
    exited = ContainerStatus(RunState.EXITED, "ns", None, "exited (code 0)", exit_code=0, runtime="light")
    agent.report_container_status("app", exited)
    wait_for(lambda: writer.container_status("app") == exited)
    asked = writer.set_container_running("app", True)
    assert asked == generation + 1
    wait_for(lambda: agent.snapshot().generation >= asked)
    assert agent.snapshot().containers["app"].starts == 1
