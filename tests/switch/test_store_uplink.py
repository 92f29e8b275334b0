"""Schema 1.7.0 (issue 14): Host.uplink, the interface a gateway host's agent made a switch port (``--uplink``).

On a real ovsdb-server: a 1.6.0 database is converted in place and its hosts read
with no uplink; the agent's report reaches the controller's reader (the column is
one of the desired ones: the switch is compiled for it) without a generation
bump; an operator's ``host add`` of the same host leaves the agent's report alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from portmesh.model.entities import Host
from portmesh.store.client import Store
from portmesh.store.reader import StateReader
from portmesh.store.rows import schema_path
from portmesh.store.server import create_db, start_server, stop_server
from tests.switch.test_store import server
from tests.switch.test_store_mirror import wait_until

__all__ = ["server"]  # the fixture, re-used

SCHEMA_VERSION = json.loads(schema_path().read_text())["version"]  # 1.7.0 or later (1.8.0: Host.counters, drops)

pytestmark = pytest.mark.switch


def schema_1_6_0(tmp_path: Path) -> Path:
    """The Portmesh schema as 1.6.0 had it: no Host.uplink."""
    schema = json.loads(schema_path().read_text())
    schema["version"] = "1.6.0"
    for column in ("uplink", "counters", "drops"):
        schema["tables"]["Host"]["columns"].pop(column, None)
    path = tmp_path / "1.6.0.ovsschema"
    path.write_text(json.dumps(schema))
    return path


def version_of(db: Path) -> str:
    return subprocess.run(["ovsdb-tool", "db-version", str(db)], check=True, capture_output=True, text=True).stdout.strip()


def test_a_new_database_is_made_at_the_current_version(tmp_path: Path) -> None:
    assert version_of(create_db(tmp_path / "store.db")) == SCHEMA_VERSION


def test_a_1_6_0_database_is_upgraded_in_place_and_its_hosts_have_no_uplink(tmp_path: Path) -> None:
    db = create_db(tmp_path / "store.db", schema_1_6_0(tmp_path))
    ops = ["Portmesh", {"op": "insert", "table": "Host", "row": {"name": "h1", "datapath_id": 1, "role": "gateway"}},
           {"op": "update", "table": "Global", "where": [], "row": {"generation": 3}}]
    subprocess.run(["ovsdb-tool", "transact", str(db), json.dumps(ops)], check=True, capture_output=True)
    cmd = [sys.executable, "-m", "portmesh.store", "upgrade", str(db)]
    assert subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip() == "converted"
    assert subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip() == "already current"
    assert version_of(db) == SCHEMA_VERSION
    pid = start_server(db, tmp_path / "store.sock", create=False)
    try:
        remote = f"unix:{tmp_path / 'store.sock'}"
        with Store(remote, timeout=10) as store, StateReader(remote, timeout=10) as reader:
            assert store.snapshot().hosts["h1"] == Host("h1", 1) == reader.snapshot().hosts["h1"]
            store.report_uplink("h1", "up0")  # the new column takes the agent's report
            wait_until(lambda: reader.snapshot().hosts["h1"].uplink == "up0")
            assert store.snapshot().generation == 3
    finally:
        stop_server(pid)


def test_the_agents_report_reaches_the_reader_and_host_add_leaves_it(server: str) -> None:
    with Store(server, timeout=10) as api, StateReader(server, timeout=10) as reader:
        api.add_host(Host("h1", 1))
        with Store(server, timeout=10, host="h1") as agent:  # the agent's own view of the store
            before = api.snapshot().generation
            agent.report_uplink("h1", "up0")
            wait_until(lambda: reader.snapshot().hosts["h1"].uplink == "up0")
            wait_until(lambda: agent.snapshot().hosts["h1"].uplink == "up0")
            agent.report_uplink("h1", "up0")  # unchanged: nothing written
            assert api.snapshot().generation == before  # a report, not a change of the desired state
            # The operator registers the host again (the lab, `portmesh host add` with may_exist): no change.
            api.add_host(Host("h1", 1), may_exist=True)
            assert api.snapshot().generation == before
            assert api.snapshot().hosts["h1"].uplink == "up0"
            agent.report_uplink("h1", None)  # the agent runs without --uplink now
            wait_until(lambda: reader.snapshot().hosts["h1"].uplink is None)
