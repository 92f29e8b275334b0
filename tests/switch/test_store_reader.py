"""StateReader (the controller's lean monitor) against a real ovsdb-server: same state as the IDL client."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from portmesh.model.entities import Host
from portmesh.model.errors import NotFound
from portmesh.store.client import Store, StoreError
from portmesh.store.reader import StateReader
from tests.switch.test_store import kill_leader, raft_cluster
from tests.switch.test_store_mirror import Model, change_while_down, random_step, server, wait_until

__all__ = ["server"]  # the fixture, re-used


def test_reader_equals_the_idl_client_after_random_writes(server: tuple[Path, Path, list[int]]) -> None:
    _, sock, _ = server
    rng = random.Random(11)
    model = Model()
    wakeups: list[int] = []
    with Store(f"unix:{sock}", timeout=5) as writer, StateReader(f"unix:{sock}", timeout=5) as reader:
        reader.subscribe(lambda: wakeups.append(reader.snapshot().generation))
        for step in range(150):
            random_step(rng, writer, model, step)
            state = writer.snapshot()
            wait_until(lambda: reader.snapshot().generation == state.generation)  # noqa: B023 (called right here)
            assert reader.snapshot() == state, f"step {step}"
        assert model.mappings and wakeups
        # Status reports change columns the reader does not monitor: they must not wake it.
        before = len(wakeups)
        host = sorted(model.hosts)[0]
        for generation in range(5):
            writer.report_switch(host, generation, True)
            writer.report_agent(host, generation)
        time.sleep(0.3)
        assert len(wakeups) == before, "status reports woke the reader"


def test_report_switch_writes_status_and_names_a_missing_host(server: tuple[Path, Path, list[int]]) -> None:
    _, sock, _ = server
    with Store(f"unix:{sock}", timeout=5) as store, StateReader(f"unix:{sock}", timeout=5) as reader:
        generation = store.add_host(Host("h1", 1))
        wait_until(lambda: "h1" in reader.snapshot().hosts)
        reader.report_switch("h1", generation, True)
        wait_until(lambda: store.host_status("h1").switch_generation == generation)
        assert store.host_status("h1").switch_connected
        assert store.snapshot().generation == generation, "a status report must not bump the generation"
        with pytest.raises(NotFound) as err:
            reader.report_switch("nope", 1, True)
        assert err.value.field == "host"


def test_reader_reloads_after_the_server_restarts(server: tuple[Path, Path, list[int]]) -> None:
    """Changes made while the reader was away (deletions included) come back with the reload."""
    db, sock, pids = server
    rng = random.Random(5)
    model = Model()
    with Store(f"unix:{sock}", timeout=5) as store:
        for step in range(40):
            random_step(rng, store, model, step)
    with StateReader(f"unix:{sock}", timeout=5) as reader:
        before = reader.snapshot()
        assert model.same(before) and before.mappings
        gone = change_while_down(db, sock, pids, before)
        wait_until(lambda: "offline" in reader.snapshot().hosts, timeout=15)
        assert set(reader.snapshot().mappings) == set(before.mappings) - set(gone)


def test_reader_follows_a_new_raft_leader(tmp_path: Path) -> None:
    """Three members; the reader reads the leader; kill it; the reader moves to the new leader and keeps up."""
    with (
        raft_cluster(tmp_path) as (remote, pids),
        Store(remote, timeout=15) as store,
        StateReader(remote, timeout=15) as reader,
    ):
        store.add_host(Host("h1", 1))
        wait_until(lambda: "h1" in reader.snapshot().hosts)
        kill_leader(tmp_path, pids)
        generation = store.add_host(Host("h2", 2))
        wait_until(lambda: reader.snapshot().generation == generation, timeout=15)
        assert set(reader.snapshot().hosts) == {"h1", "h2"}
        reader.report_switch("h2", generation, True)
        wait_until(lambda: store.host_status("h2").switch_generation == generation, timeout=15)


def test_a_failed_reader_thread_makes_snapshot_raise(server: tuple[Path, Path, list[int]]) -> None:
    """A reader that stopped on an error must say so, not serve a stale replica forever."""
    _, sock, _ = server
    with Store(f"unix:{sock}", timeout=5) as store, StateReader(f"unix:{sock}", timeout=5) as reader:
        def broken(updates: object) -> None:
            raise RuntimeError("bug in update handling (test)")

        reader._apply2 = broken  # type: ignore[method-assign]
        failed = threading.Event()
        reader.subscribe(lambda: failed.set() if reader._failure is not None else None)
        store.add_host(Host("h1", 1))
        assert failed.wait(5), "subscribers are told when the reader fails"
        with pytest.raises(StoreError, match="bug in update handling"):
            reader.snapshot()
