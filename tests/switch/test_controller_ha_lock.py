"""Controller leader election in the store: the OVSDB lock, the epoch, schema 1.5.0 (issue 13 item 6).

Real ovsdb-server, standalone and a 3-member Raft cluster. What the controller relies on:
one lock holder at a time among readers of the same cluster; an epoch that only grows and
that nobody but the lock holder can claim; status writes refused to a non-holder; the lock
handed over at once when its holder's connection dies; a 1.4.0 database upgraded in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # ovs.poller's eventlet-detection banner
    import ovs.jsonrpc
    import ovs.stream

from portmesh.model.entities import Host
from portmesh.store.client import Store
from portmesh.store.engine import StoreError
from portmesh.store.reader import StateReader
from portmesh.store.rows import schema_path
from portmesh.store.server import create_db, start_server, stop_server, upgrade_db
from tests.switch.test_store import _free_port, _role, raft_cluster, server

__all__ = ["server"]  # the fixture, re-used

pytestmark = pytest.mark.switch

LOCK = "portmesh_controller"


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> float:
    """Poll ``cond`` until true; return how long it took (fails the test on timeout)."""
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, "condition not met in time"
        time.sleep(0.01)
    return time.monotonic() - start


def holders(readers: list[StateReader]) -> list[StateReader]:
    return [r for r in readers if r.lock_held()]


def test_one_holder_an_epoch_that_grows_and_writes_only_by_the_holder(server: str) -> None:
    a, b = StateReader(server, lock=LOCK), StateReader(server, lock=LOCK)
    a.start()
    b.start()
    try:
        with Store(server) as store:
            store.add_host(Host("h1", 1))
        wait_for(lambda: len(holders([a, b])) == 1)
        (holder,) = holders([a, b])
        other = b if holder is a else a
        first = holder.claim_epoch("a")
        assert first >= 1
        wait_for(lambda: other.leader() == (first, "a"))  # the standby sees who is master, and the epoch
        holder.report_switch("h1", 3, True)  # positive control for the refusals below
        with pytest.raises(StoreError, match="not owner"):
            other.claim_epoch("b")
        with pytest.raises(StoreError, match="not owner"):
            other.report_switch("h1", 4, True)
        # The holder goes away (its connection closes): the other gets the lock and a higher epoch.
        holder.close()
        took = wait_for(other.lock_held, 5.0)
        assert other.claim_epoch("b") == first + 1
        print(f"lock handed over {took * 1000:.0f} ms after the holder closed")
    finally:
        for r in (a, b):
            if r._thread.is_alive():
                r.close()


def test_an_epoch_claimed_above_a_switchs_id_jumps_past_it_and_keeps_growing(server: str) -> None:
    """claim_epoch(above=N): what a master does when a switch has seen a generation id the store's epoch
    does not exceed (a store restored from an older copy); only the holder can, as for every claim."""
    a, b = StateReader(server, lock=LOCK), StateReader(server, lock=LOCK)
    a.start()
    b.start()
    try:
        wait_for(lambda: len(holders([a, b])) == 1)
        (holder,) = holders([a, b])
        other = b if holder is a else a
        first = holder.claim_epoch("x")
        assert holder.claim_epoch("x", above=first + 50) == first + 51
        assert holder.claim_epoch("x", above=3) == first + 52  # never back
        assert holder.claim_epoch("x") == first + 53
        with pytest.raises(StoreError, match="not owner"):
            other.claim_epoch("y", above=10_000)
    finally:
        a.close()
        b.close()


def test_relinquish_hands_the_lock_to_the_waiter(server: str) -> None:
    a, b = StateReader(server, lock=LOCK), StateReader(server, lock=LOCK)
    a.start()
    b.start()
    try:
        wait_for(lambda: len(holders([a, b])) == 1)
        (holder,) = holders([a, b])
        other = b if holder is a else a
        holder.relinquish()
        wait_for(other.lock_held, 5.0)
        assert not holder.lock_held()
    finally:
        a.close()
        b.close()


def test_a_raft_member_holds_its_own_locks(tmp_path: Path) -> None:
    """Why the reader takes the lock on the leader only: ovsdb-server 3.1 keeps locks per member
    (not replicated), so clients on different members all get "the" lock (checked here); readers
    that follow the leader meet on one server, and exactly one holds the lock."""
    with raft_cluster(tmp_path) as (remote, pids):
        # Every member in the cluster first (a member still joining answers a lock with an error).
        wait_for(lambda: sorted(_role(tmp_path / f"m{i}.ctl") for i in range(3)) == ["follower", "follower", "leader"],
                 20.0)
        conns = []
        try:
            for i in range(3):
                _, stream = ovs.stream.Stream.open_block(ovs.stream.Stream.open(f"unix:{tmp_path / f'm{i}.sock'}"))
                conn = ovs.jsonrpc.Connection(stream)
                conns.append(conn)
                err, reply = conn.transact_block(ovs.jsonrpc.Message.create_request("lock", ["per_member"]))
                assert err == 0 and reply.result == {"locked": True}, (i, err, reply.error)
        finally:
            for conn in conns:
                conn.close()
        readers = [StateReader(remote, timeout=15, lock=LOCK) for _ in range(3)]
        for r in readers:
            r.start()
        try:
            wait_for(lambda: len(holders(readers)) == 1)
            time.sleep(0.5)
            assert len(holders(readers)) == 1  # and it stays one
            epoch = holders(readers)[0].claim_epoch("first")
            # Kill -9 the leader they all are on: they move to the new leader, where one gets the lock again.
            leader = next(i for i in range(3) if _role(tmp_path / f"m{i}.ctl") == "leader")
            pid = pids.pop(leader)
            os.kill(pid, signal.SIGKILL)
            stop_server(pid)
            # A reader may not have noticed yet: the claim that succeeds is the proof of a holder.
            t0 = time.monotonic()
            second = 0
            while not second:
                assert time.monotonic() - t0 < 20, "no reader holds the lock on the new leader"
                for r in holders(readers):
                    try:
                        second = r.claim_epoch("second")
                        break
                    except StoreError:
                        pass
                time.sleep(0.02)
            took = time.monotonic() - t0
            assert second > epoch  # never reused across a leader change
            time.sleep(0.5)
            assert len(holders(readers)) == 1
            print(f"lock re-held on the new leader {took:.2f} s after the leader kill; epoch {epoch} -> {second}")
        finally:
            for r in readers:
                r.close()


def test_concurrent_claims_never_share_an_epoch(server: str) -> None:
    """Many claims from the holder while the lock moves between two readers: every epoch distinct."""
    readers = [StateReader(server, lock=LOCK), StateReader(server, lock=LOCK)]
    for r in readers:
        r.start()
    got: list[int] = []
    lock = threading.Lock()

    def claim(r: StateReader) -> None:
        for _ in range(20):
            try:
                e = r.claim_epoch("x")
            except StoreError:
                continue  # not the holder now: refused, never a duplicate
            with lock:
                got.append(e)
            r.relinquish()
            time.sleep(0.01)

    try:
        threads = [threading.Thread(target=claim, args=(r,)) for r in readers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got, "no claim succeeded"  # positive control
        assert len(got) == len(set(got)), sorted(got)
    finally:
        for r in readers:
            r.close()


def schema_1_4_0(tmp_path: Path) -> Path:
    schema = json.loads(schema_path().read_text())
    schema["version"] = "1.4.0"
    for column in ("controller_epoch", "controller_master"):
        del schema["tables"]["Global"]["columns"][column]
    path = tmp_path / "1.4.0.ovsschema"
    path.write_text(json.dumps(schema))
    return path


def test_a_1_4_0_database_upgrades_and_the_epoch_starts_at_1(tmp_path: Path) -> None:
    db = create_db(tmp_path / "store.db", schema_1_4_0(tmp_path))
    insert = ["Portmesh", {"op": "insert", "table": "Host", "row": {"name": "h1", "datapath_id": 1}}]
    subprocess.run(["ovsdb-tool", "transact", str(db), json.dumps(insert)], check=True, capture_output=True)
    assert upgrade_db(db) is True
    assert upgrade_db(db) is False
    pid = start_server(db, tmp_path / "store.sock")
    try:
        with StateReader(f"unix:{tmp_path / 'store.sock'}", lock=LOCK) as reader:
            assert "h1" in reader.snapshot().hosts  # rows kept
            wait_for(reader.lock_held)
            assert reader.leader() == (0, "")
            assert reader.claim_epoch("c1") == 1
            wait_for(lambda: reader.leader() == (1, "c1"))
    finally:
        stop_server(pid)


def test_a_1_4_0_cluster_upgraded_online_lets_a_waiting_controller_claim(tmp_path: Path) -> None:
    """A reader started against a 1.4.0 Raft cluster cannot claim an epoch (no such column); after
    ``python -m portmesh.store upgrade tcp:...`` (online) it reconnects and claims epoch 1."""
    seed = create_db(tmp_path / "seed.db", schema_1_4_0(tmp_path))
    ops = ["Portmesh", {"op": "insert", "table": "Host", "row": {"name": "h1", "datapath_id": 1}},
           {"op": "update", "table": "Global", "where": [], "row": {"generation": 3}}]  # create_db wrote one
    out = subprocess.run(["ovsdb-tool", "transact", str(seed), json.dumps(ops)], check=True, capture_output=True)
    assert b"error" not in out.stdout, out.stdout
    db = tmp_path / "m0.db"
    subprocess.run(["ovsdb-tool", "create-cluster", str(db), str(seed), f"tcp:127.0.0.1:{_free_port()}"], check=True)
    port = _free_port()
    pid = start_server(db, tmp_path / "m0.sock", tcp=f"127.0.0.1:{port}", create=False)
    remote = f"tcp:127.0.0.1:{port}"
    try:
        with StateReader(remote, timeout=15, lock=LOCK) as reader:
            wait_for(reader.lock_held)
            assert reader.snapshot().generation == 3 and "h1" in reader.snapshot().hosts
            with pytest.raises(StoreError):
                reader.claim_epoch("c1")
            cmd = [sys.executable, "-m", "portmesh.store", "upgrade", remote]
            assert subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip() == "converted"
            epoch = 0
            deadline = time.monotonic() + 15
            while not epoch:
                assert time.monotonic() < deadline, "no claim after the upgrade"
                with contextlib.suppress(StoreError):
                    epoch = reader.claim_epoch("c1")
                time.sleep(0.05)
            assert epoch == 1
            wait_for(lambda: reader.leader() == (1, "c1"))
            assert reader.snapshot().generation == 3 and "h1" in reader.snapshot().hosts
    finally:
        stop_server(pid)
