"""The controller's reader resumes with monitor_cond_since after a server restart or a Raft leader change.

A Raft member keeps the recent transactions (its log since the last snapshot), so
a reader that reconnects with the last transaction id it saw gets only what
changed since (``found=true``): asserted by the reader's own counters
(``stats()``: full loads, resumes, rows the server sent). A standalone
ovsdb-server keeps no transaction history (ovsdb-server.c enables it for
clustered and relay databases only), so there the resume falls back to a full
load, which must be just as correct.
"""

from __future__ import annotations

import os
import random
import signal
from ipaddress import IPv4Address
from pathlib import Path

from portmesh.model.entities import Container, Host, Mapping, MappingKey, PortBlock, Proto, mac_for
from portmesh.store.client import Store
from portmesh.store.reader import StateReader
from portmesh.store.server import start_server, stop_server
from tests.switch.test_store import _role, raft_cluster
from tests.switch.test_store_mirror import Model, random_step, server, wait_until

__all__ = ["server"]  # the fixture, re-used


def _bulk(store: Store, n: int) -> None:
    """A host and a container with ``n`` mappings, kept out of the random writes' model (so they stay):
    enough rows that a full load and a resume differ."""
    host = Host("bulk", 9)
    store.add_host(host)
    ip = IPv4Address("198.51.100.7")
    c = Container("bulk", "bulk", mac_for("bulk"), (ip,), PortBlock(61440, 1024))
    ms = [Mapping(MappingKey(ip, Proto.TCP, 1000 + i), "bulk") for i in range(n)]
    store.add_container(c, ms)


def _writes(rng: random.Random, store: Store, model: Model, steps: range) -> None:
    for step in steps:
        random_step(rng, store, model, step)


def _caught_up(reader: StateReader, store: Store) -> bool:
    return reader.snapshot().generation == store.snapshot().generation


def _leader(tmp_path: Path) -> int:
    return next(i for i in range(3) if _role(tmp_path / f"m{i}.ctl") == "leader")


def test_reader_resumes_on_the_new_leader_with_only_the_changes(tmp_path: Path) -> None:
    """Kill -9 the leader the reader is on; write more; the reader resumes (found=true) on the new leader."""
    rng = random.Random(21)
    model = Model()
    with raft_cluster(tmp_path) as (remote, pids), Store(remote, timeout=15) as store:
        _bulk(store, 300)
        _writes(rng, store, model, range(60))
        with StateReader(remote, timeout=15) as reader:
            assert reader.stats()["full_loads"] == 1 and reader.stats()["resumes"] == 0
            assert reader.snapshot() == store.snapshot()
            loaded = reader.stats()["rows_loaded"]
            assert loaded > 300, "positive control: the first load brings every row"
            leader = _leader(tmp_path)
            os.kill(pids.pop(leader), signal.SIGKILL)
            _writes(rng, store, model, range(60, 70))
            wait_until(lambda: reader.stats()["resumes"] + reader.stats()["full_loads"] == 2, timeout=20)
            wait_until(lambda: _caught_up(reader, store), timeout=15)
            stats = reader.stats()
            assert stats == {**stats, "full_loads": 1, "resumes": 1}, stats
            assert stats["rows_loaded"] - loaded < 100, "the resume must bring only the changes"
            assert reader.snapshot() == store.snapshot()
            # Diffs keep applying after the resume (update3 notifications).
            _writes(rng, store, model, range(70, 110))
            wait_until(lambda: _caught_up(reader, store), timeout=15)
            assert reader.snapshot() == store.snapshot()


def test_reader_resumes_after_the_whole_cluster_restarts(tmp_path: Path) -> None:
    """Stop all three members, start them again from their files: the log still has the reader's id."""
    rng = random.Random(22)
    model = Model()
    with raft_cluster(tmp_path) as (remote, pids), Store(remote, timeout=20) as store:
        _bulk(store, 300)
        _writes(rng, store, model, range(50))
        with StateReader(remote, timeout=20) as reader:
            wait_until(lambda: _caught_up(reader, store))
            loaded = reader.stats()["rows_loaded"]
            for i in list(pids):
                stop_server(pids.pop(i))
            for i in range(3):
                pids[i] = start_server(tmp_path / f"m{i}.db", tmp_path / f"m{i}.sock", create=False)
            _writes(rng, store, model, range(50, 60))
            wait_until(lambda: reader.stats()["resumes"] + reader.stats()["full_loads"] >= 2, timeout=20)
            wait_until(lambda: _caught_up(reader, store), timeout=20)
            stats = reader.stats()
            assert (stats["full_loads"], stats["resumes"]) == (1, 1), stats
            assert stats["rows_loaded"] - loaded < 100, "the resume must bring only the changes"
            assert reader.snapshot() == store.snapshot()


def test_standalone_server_restart_falls_back_to_a_full_load(server: tuple[Path, Path, list[int]]) -> None:
    """No transaction history on a standalone server: found=false, everything sent again, same state."""
    db, sock, pids = server
    rng = random.Random(23)
    model = Model()
    with Store(f"unix:{sock}", timeout=5) as store:
        _bulk(store, 300)
        _writes(rng, store, model, range(40))
    with StateReader(f"unix:{sock}", timeout=5) as reader:
        loaded = reader.stats()["rows_loaded"]
        stop_server(pids.pop())
        pids.append(start_server(db, sock, create=False))
        with Store(f"unix:{sock}", timeout=5) as store:
            _writes(rng, store, model, range(40, 60))
            wait_until(lambda: reader.stats()["full_loads"] == 2, timeout=15)
            wait_until(lambda: _caught_up(reader, store), timeout=15)
            stats = reader.stats()
            assert stats["resumes"] == 0 and stats["rows_loaded"] - loaded > 300, stats
            assert reader.snapshot() == store.snapshot()
