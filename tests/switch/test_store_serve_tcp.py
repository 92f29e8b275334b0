"""The store's entry points as the lab and the systemd units run them: ``python -m portmesh.store serve
--tcp IP:PORT`` (standalone, and on each member of a Raft cluster made by ``create-cluster`` /
``join-cluster``), with the IDL client and the controller's reader connecting over ``tcp:IP:PORT``."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from portmesh.model.config import DEFAULT_CONFIG
from portmesh.model.entities import Host
from portmesh.store.client import Store
from portmesh.store.reader import StateReader
from portmesh.store.server import stop_server
from tests.switch.test_store import _free_port, make_cluster_dbs
from tests.switch.test_store_mirror import wait_until

pytestmark = pytest.mark.skipif(shutil.which("ovsdb-server") is None, reason="openvswitch is not installed")


@contextlib.contextmanager
def serve(db: Path, name: str, tcp: str) -> Iterator[int]:
    """``python -m portmesh.store serve`` in the foreground (it execs ovsdb-server); its PID, stopped on exit."""
    sock, pidfile = db.with_name(f"{name}.sock"), db.with_name(f"{name}.pid")
    cmd = [sys.executable, "-m", "portmesh.store", "serve", "--db", str(db), "--socket", str(sock), "--tcp", tcp,
           "--pidfile", str(pidfile)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() == str(proc.pid))
        yield proc.pid
    finally:
        stop_server(proc.pid)


def test_serve_tcp_standalone_reaches_the_idl_client_and_the_reader(tmp_path: Path) -> None:
    port = _free_port()
    with serve(tmp_path / "store.db", "store", f"127.0.0.1:{port}"):
        remote = f"tcp:127.0.0.1:{port}"
        with Store(remote, timeout=5) as store, StateReader(remote, timeout=5) as reader:
            assert store.snapshot().config == DEFAULT_CONFIG
            generation = store.add_host(Host("h1", 1))
            wait_until(lambda: reader.snapshot().generation == generation)
            assert reader.snapshot() == store.snapshot()
            reader.report_switch("h1", generation, True)
            wait_until(lambda: store.host_status("h1").switch_generation == generation)


def test_a_cluster_made_by_the_entry_points_serves_over_tcp(tmp_path: Path) -> None:
    dbs = make_cluster_dbs(tmp_path)
    ports = [_free_port() for _ in dbs]
    with contextlib.ExitStack() as stack:
        pids = [stack.enter_context(serve(db, f"m{i}", f"127.0.0.1:{ports[i]}")) for i, db in enumerate(dbs)]
        remote = ",".join(f"tcp:127.0.0.1:{p}" for p in ports)
        with Store(remote, timeout=15) as store, StateReader(remote, timeout=15) as reader:
            assert store.snapshot().config == DEFAULT_CONFIG  # the seed's Global row, replicated
            generation = store.add_host(Host("h1", 1))
            wait_until(lambda: reader.snapshot().generation == generation)
            assert reader.snapshot() == store.snapshot()
            # Every member holds the data (a member that joined took it from the cluster).
            for port in ports:
                out = subprocess.run(
                    ["ovsdb-client", "dump", f"tcp:127.0.0.1:{port}", "Portmesh", "Host", "name"],
                    check=True, capture_output=True, text=True,
                ).stdout
                assert "h1" in out
        assert all(os.path.exists(f"/proc/{pid}") for pid in pids)


def test_cluster_commands_refuse_bad_input_in_one_line(tmp_path: Path) -> None:
    store = [sys.executable, "-m", "portmesh.store"]
    bad = subprocess.run([*store, "create-cluster", "--db", str(tmp_path / "x.db"), "--local", "127.0.0.1:6641"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--local" in bad.stderr and not (tmp_path / "x.db").exists()
    (tmp_path / "y.db").write_text("")
    taken = subprocess.run([*store, "create-cluster", "--db", str(tmp_path / "y.db"), "--local",
                            f"tcp:127.0.0.1:{_free_port()}"], capture_output=True, text=True)
    assert taken.returncode != 0 and "already exists" in taken.stderr
    ok = subprocess.run([*store, "create-cluster", "--db", str(tmp_path / "z.db"), "--local",
                         f"tcp:127.0.0.1:{_free_port()}"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr  # positive control
