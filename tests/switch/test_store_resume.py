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
import sys
import threading
import time
import warnings
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # ovs.poller's eventlet-detection banner
    import ovs.stream

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
            assert stats["full_loads"] == 1 and stats["resumes"] >= 1, stats
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
            assert stats["full_loads"] == 1 and stats["resumes"] >= 1, stats
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


def _rss_kb() -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1])


@pytest.mark.skipif(not os.environ.get("PORTMESH_RESUME_BENCH"), reason="measurement: PORTMESH_RESUME_BENCH=N")
def test_measure_resume_vs_full_reload(tmp_path: Path) -> None:
    """N mappings (PORTMESH_RESUME_BENCH) in a 3-member cluster; two readers on it, one resuming and one
    loading in full on every reconnection (plain ``monitor``, the behaviour before); kill -9 the leader,
    change 10 mappings (with PORTMESH_RESUME_BENCH_RESTART=1: stop and start every member instead);
    report each reader's load time, bytes received and rows, and the time from the kill until it
    holds the new state. Bytes are counted per reader thread at the stream."""
    n = int(os.environ["PORTMESH_RESUME_BENCH"])
    received: dict[str, int] = {}
    recv = ovs.stream.Stream.recv

    def counting(self: Any, size: int) -> Any:
        error, data = recv(self, size)
        name = threading.current_thread().name
        received[name] = received.get(name, 0) + len(data or b"")
        return error, data

    with raft_cluster(tmp_path) as (remote, pids), Store(remote, timeout=120) as store:
        store.add_host(Host("h1", 1))
        t0 = time.monotonic()
        for i in range(-(-n // 250)):
            ip = IPv4Address(int(IPv4Address("198.18.0.1")) + i // 60)
            name = f"c{i}"
            c = Container(name, "h1", mac_for(name), (ip,), PortBlock(1024 * (1 + i % 60), 1024))
            count = min(250, n - i * 250)
            store.add_container(c, [Mapping(MappingKey(ip, Proto.TCP, 1024 * (1 + i % 60) + j), name)
                                    for j in range(count)])
        populate_s = time.monotonic() - t0
        ovs.stream.Stream.recv = counting  # type: ignore[method-assign]
        try:
            # The full reader starts first: the first load grows the heap, the second reuses it.
            readers = {"full": StateReader(remote, timeout=300), "resume": StateReader(remote, timeout=300)}
            readers["full"]._since = False
            first: dict[str, dict[str, float]] = {}
            for label, reader in readers.items():
                reader._thread.name = label
                rss = _rss_kb()
                t0 = time.monotonic()
                reader.start()
                first[label] = {"load_s": time.monotonic() - t0, "bytes": received.get(label, 0),
                                "rss_mb": (_rss_kb() - rss) / 1024}
                assert len(reader.snapshot().mappings) == n
            cache = readers["resume"]._rows.rows
            cache_mb = sum(sys.getsizeof(rows) + sum(sys.getsizeof(t) for t in rows.values())
                           for rows in cache.values()) / 2**20
            before = {label: received.get(label, 0) for label in readers}
            if os.environ.get("PORTMESH_RESUME_BENCH_RESTART"):  # every member stopped and started again
                for i in list(pids):
                    stop_server(pids.pop(i))
                killed = time.monotonic()
                for i in range(3):
                    pids[i] = start_server(tmp_path / f"m{i}.db", tmp_path / f"m{i}.sock", create=False)
            else:
                os.kill(pids.pop(_leader(tmp_path)), signal.SIGKILL)
                killed = time.monotonic()
            for j in range(5):
                store.remove_mapping(MappingKey(IPv4Address("198.18.0.1"), Proto.TCP, 1024 + j))
                store.add_mapping(Mapping(MappingKey(IPv4Address("198.18.0.1"), Proto.TCP, 2000 + j), "c0"))
            generation = store.snapshot().generation
            caught: dict[str, float] = {}
            while len(caught) < 2:
                for label, reader in readers.items():
                    if label not in caught and reader.snapshot().generation == generation:
                        caught[label] = time.monotonic() - killed
                assert time.monotonic() - killed < 300
                time.sleep(0.005)
            for label, reader in readers.items():
                stats = reader.stats()
                assert reader.snapshot() == store.snapshot()
                print(f"\n{label}: first load {first[label]['load_s']:.2f} s, {first[label]['bytes']} bytes, "
                      f"+{first[label]['rss_mb']:.0f} MB RSS; after the fault: "
                      f"{'resume' if stats['resumes'] else 'full reload'} {stats['last_load_ms']} ms "
                      f"(request to applied), {received.get(label, 0) - before[label]} bytes, "
                      f"{caught[label]:.2f} s from kill to current; stats {stats}")
                reader.close()
            assert readers["resume"].stats()["full_loads"] == 1 and readers["full"].stats()["resumes"] == 0
            print(f"populate {n} mappings: {populate_s:.1f} s; the resume reader's row cache: {cache_mb:.0f} MB")
        finally:
            ovs.stream.Stream.recv = recv  # type: ignore[method-assign]


def test_the_idl_client_resumes_too_without_a_rebuild(tmp_path: Path) -> None:
    """The agents' path (``Store``, the OVS IDL) already sends monitor_cond_since with its last id
    (ovs/db/idl.py ``__send_monitor_request``) and clears its cache only on found=false: a leader
    kill must not rebuild the mirror, and a reader watching the same writes must agree with it."""
    rng = random.Random(24)
    model = Model()
    with raft_cluster(tmp_path) as (remote, pids), Store(remote, timeout=15) as store, Store(remote, timeout=15) as agent:
        _bulk(store, 300)
        _writes(rng, store, model, range(40))
        wait_until(lambda: agent.snapshot().generation == store.snapshot().generation)
        reloads: list[int] = []
        rebuild = agent._mirror.rebuild

        def counted(tables: Any) -> None:
            reloads.append(1)
            rebuild(tables)

        agent._mirror.rebuild = counted  # type: ignore[method-assign]
        os.kill(pids.pop(_leader(tmp_path)), signal.SIGKILL)
        _writes(rng, store, model, range(40, 60))
        wait_until(lambda: agent.snapshot().generation == store.snapshot().generation, timeout=20)
        assert agent.snapshot() == store.snapshot()
        assert not reloads, "the IDL client reloaded everything instead of resuming"
        # Positive control: a new client does a full load and gets the same state.
        with Store(remote, timeout=15) as fresh:
            assert fresh.snapshot() == agent.snapshot()


def test_no_torn_snapshot_across_a_resume(tmp_path: Path) -> None:
    """Each write adds or removes a container together with its 10 mappings; snapshots taken all the
    time, across a leader kill and the resume, must show each container whole or not at all.

    Whether the server still knows the reader's id depends on timing (its history keeps at most 100
    transactions and no more atoms than the database holds), so either answer is accepted here;
    both must be applied in one piece."""
    torn: list[str] = []
    seen = [0]
    stop = threading.Event()

    def watch(reader: StateReader) -> None:
        while not stop.is_set():
            state = reader.snapshot()
            seen[0] += 1
            per: dict[str, int] = {}
            for m in state.mappings.values():
                if m.container == "bulk":
                    continue
                per[m.container] = per.get(m.container, 0) + 1
            bad = {c: k for c, k in per.items() if k != 10 or c not in state.containers}
            bad.update({c: 0 for c in state.containers if c not in per and c != "bulk"})
            if bad:
                torn.append(f"generation {state.generation}: {bad}")

    with raft_cluster(tmp_path) as (remote, pids), Store(remote, timeout=20) as store, \
            StateReader(remote, timeout=20) as reader:
        store.add_host(Host("h1", 1))
        _bulk(store, 300)
        watcher = threading.Thread(target=watch, args=(reader,), daemon=True)
        watcher.start()
        try:
            for i in range(60):
                ip = IPv4Address(f"198.51.100.{1 + i % 200}")
                c = Container(f"t{i}", "h1", mac_for(f"t{i}"), (ip,), PortBlock(1024 * (1 + i % 60), 1024))
                store.add_container(c, [Mapping(MappingKey(ip, Proto.UDP, 100 + j), c.name) for j in range(10)])
                if i % 3 == 2:
                    store.remove_container(f"t{i - 1}")
                if i == 30:
                    os.kill(pids.pop(_leader(tmp_path)), signal.SIGKILL)
            wait_until(lambda: _caught_up(reader, store), timeout=20)
        finally:
            stop.set()
            watcher.join(5)
        stats = reader.stats()
        assert stats["resumes"] + stats["full_loads"] >= 2, stats
        assert seen[0] > 100, "positive control: the watcher took snapshots all along"
        assert len(reader.snapshot().containers) == 41 and not torn, torn[:3]
        assert reader.snapshot() == store.snapshot()
