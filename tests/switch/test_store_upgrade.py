"""A database kept from an older schema is converted when its server starts (schema 1.2.0 added
Host.switch_waiting, which the controller writes with every report): rows kept, new column usable."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from portmesh.model.config import DEFAULT_CONFIG
from portmesh.model.entities import HostRole, HostStatus
from portmesh.store.client import Store
from portmesh.store.rows import CONFIG_COLUMNS, schema_path
from portmesh.store.server import create_db, start_server, stop_server, upgrade_db
from tests.switch.old_schemas import older_schema

pytestmark = pytest.mark.skipif(shutil.which("ovsdb-server") is None, reason="openvswitch is not installed")


def old_schema(tmp_path: Path) -> Path:
    """The Portmesh schema as 1.1.0 had it: no Host.switch_waiting."""
    return older_schema(tmp_path, "1.1.0", "switch_waiting")


def test_old_database_is_converted_on_start_and_keeps_its_rows(tmp_path: Path) -> None:
    db = create_db(tmp_path / "store.db", old_schema(tmp_path))
    insert = ["Portmesh", {"op": "insert", "table": "Host", "row": {"name": "h1", "datapath_id": 1}}]
    subprocess.run(["ovsdb-tool", "transact", str(db), json.dumps(insert)], check=True, capture_output=True)
    pid = start_server(db, tmp_path / "store.sock")
    try:
        with Store(f"unix:{tmp_path / 'store.sock'}") as store:
            assert "h1" in store.snapshot().hosts  # the row survived the conversion
            store.report_switch("h1", 7, True, {"x", "y"})
            want = HostStatus(switch_generation=7, switch_connected=True, switch_waiting=frozenset({"x", "y"}))
            deadline = time.monotonic() + 10
            while store.host_status("h1") != want and time.monotonic() < deadline:
                time.sleep(0.01)
            assert store.host_status("h1") == want
    finally:
        stop_server(pid)
    assert upgrade_db(db) is False  # already current: nothing to do


def test_upgrade_is_needed_for_an_old_database(tmp_path: Path) -> None:
    db = create_db(tmp_path / "store.db", old_schema(tmp_path))
    assert upgrade_db(db) is True  # positive control: an old database does need it
    assert upgrade_db(db) is False


def schema_1_3_0(tmp_path: Path) -> Path:
    """The Portmesh schema as 1.3.0 had it: no configuration in Global, no Host.role nor Host.tunnels."""
    schema = json.loads(schema_path().read_text())
    schema["version"] = "1.3.0"
    for column in CONFIG_COLUMNS:
        del schema["tables"]["Global"]["columns"][column]
    for column in ("role", "tunnels"):
        del schema["tables"]["Host"]["columns"][column]
    path = tmp_path / "1.3.0.ovsschema"
    path.write_text(json.dumps(schema))
    return path


@pytest.mark.parametrize("with_global", [True, False])
def test_a_1_3_0_database_gets_the_default_config_written_and_its_hosts_become_gateways(
    tmp_path: Path, with_global: bool
) -> None:
    db = create_db(tmp_path / "store.db", schema_1_3_0(tmp_path))
    ops: list[object] = ["Portmesh", {"op": "insert", "table": "Host", "row": {"name": "h1", "datapath_id": 1}}]
    if with_global:
        ops.append({"op": "insert", "table": "Global", "row": {"generation": 5}})
    subprocess.run(["ovsdb-tool", "transact", str(db), json.dumps(ops)], check=True, capture_output=True)
    pid = start_server(db, tmp_path / "store.sock")
    try:
        with Store(f"unix:{tmp_path / 'store.sock'}") as store:
            state = store.snapshot()
            assert state.generation == (5 if with_global else 0)
            assert state.config == DEFAULT_CONFIG  # written explicitly, not a fallback: see below
            assert state.hosts["h1"].role is HostRole.GATEWAY
            assert store.set_config(replace(DEFAULT_CONFIG, public_pools=())) == state.generation + 1
            assert store.snapshot().config.public_pools == ()
    finally:
        stop_server(pid)
    dump = subprocess.run(
        ["ovsdb-tool", "query", str(db),
         json.dumps(["Portmesh", {"op": "select", "table": "Host", "where": [], "columns": ["role"]}])],
        check=True, capture_output=True, text=True,
    ).stdout
    assert json.loads(dump)[0]["rows"] == [{"role": "gateway"}]  # the role is in the row, not only read so
    # Restarting (upgrade_db runs again) keeps the operator's choice: an empty pool set stays empty.
    assert upgrade_db(db) is False
    pid = start_server(db, tmp_path / "store.sock")
    try:
        with Store(f"unix:{tmp_path / 'store.sock'}") as store:
            assert store.snapshot().config.public_pools == ()
            assert store.snapshot().config.vxlan_vni == DEFAULT_CONFIG.vxlan_vni  # positive control: config read
    finally:
        stop_server(pid)


def test_a_new_database_holds_the_default_config_explicitly(tmp_path: Path) -> None:
    db = create_db(tmp_path / "store.db")
    out = subprocess.run(
        ["ovsdb-tool", "query", str(db), json.dumps(["Portmesh", {"op": "select", "table": "Global", "where": []}])],
        check=True, capture_output=True, text=True,
    ).stdout
    (row,) = json.loads(out)[0]["rows"]
    assert row["generation"] == 0
    assert row["public_pools"] == "203.0.113.0/24" and row["vxlan_port"] == 4789 and row["container_mtu"] == 1450


def test_a_1_3_0_cluster_is_upgraded_online_by_the_upgrade_command(tmp_path: Path) -> None:
    """A Raft cluster is converted online (ovsdb-client convert), then gets the claims and config it lacks."""
    from tests.switch.test_store import _free_port

    old = schema_1_3_0(tmp_path)
    seed = create_db(tmp_path / "seed.db", old)
    ops = ["Portmesh", {"op": "insert", "table": "Host", "row": {"name": "h1", "datapath_id": 1}},
           {"op": "insert", "table": "Global", "row": {"generation": 3}}]
    subprocess.run(["ovsdb-tool", "transact", str(seed), json.dumps(ops)], check=True, capture_output=True)
    db = tmp_path / "m0.db"
    subprocess.run(["ovsdb-tool", "create-cluster", str(db), str(seed), f"tcp:127.0.0.1:{_free_port()}"], check=True)
    port = _free_port()
    pid = start_server(db, tmp_path / "m0.sock", tcp=f"127.0.0.1:{port}", create=False)
    try:
        remote = f"tcp:127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "portmesh.store", "upgrade", remote]
        first = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        assert first.strip() == "converted"
        assert subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip() == "already current"
        with Store(remote) as store:
            state = store.snapshot()
            assert state.generation == 3 and state.config == DEFAULT_CONFIG
            assert state.hosts["h1"].role is HostRole.GATEWAY
    finally:
        stop_server(pid)
