"""A database kept from an older schema is converted when its server starts (schema 1.2.0 added
Host.switch_waiting, which the controller writes with every report): rows kept, new column usable."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from portmesh.model.entities import HostStatus
from portmesh.store.client import Store
from portmesh.store.rows import schema_path
from portmesh.store.server import create_db, start_server, stop_server, upgrade_db

pytestmark = pytest.mark.skipif(shutil.which("ovsdb-server") is None, reason="openvswitch is not installed")


def old_schema(tmp_path: Path) -> Path:
    """The Portmesh schema as 1.1.0 had it: no Host.switch_waiting."""
    schema = json.loads(schema_path().read_text())
    schema["version"] = "1.1.0"
    del schema["tables"]["Host"]["columns"]["switch_waiting"]
    path = tmp_path / "old.ovsschema"
    path.write_text(json.dumps(schema))
    return path


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
