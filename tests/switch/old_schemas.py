"""Databases of an older store schema, for the tests that an upgrade converts them in place.

Each schema bump (1.1.0 switch_waiting, 1.8.0 counters/drops, 1.9.0 heartbeat/datapath) is tested the
same way: the current schema with the new Host columns taken out, a database of it holding one host,
``portmesh-store upgrade``, then a server on the converted file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from portmesh.store.client import Store
from portmesh.store.rows import schema_path
from portmesh.store.server import create_db, start_server, stop_server

ONE_HOST = ["Portmesh", {"op": "insert", "table": "Host", "row": {"name": "h1", "datapath_id": 1}}]


def older_schema(tmp_path: Path, version: str, *host_columns: str) -> Path:
    """The Portmesh schema as ``version`` had it: the current one without these Host columns."""
    schema = json.loads(schema_path().read_text())
    schema["version"] = version
    for column in host_columns:
        del schema["tables"]["Host"]["columns"][column]
    path = tmp_path / f"{version}.ovsschema"
    path.write_text(json.dumps(schema))
    return path


def database_with_one_host(tmp_path: Path, schema: Path) -> Path:
    """A database of ``schema`` holding host h1."""
    db = create_db(tmp_path / "store.db", schema)
    subprocess.run(["ovsdb-tool", "transact", str(db), json.dumps(ONE_HOST)], check=True, capture_output=True)
    return db


@contextmanager
def upgraded_store(tmp_path: Path, schema: Path) -> Iterator[Store]:
    """A one-host database of ``schema`` converted by ``portmesh-store upgrade`` (asserted: it says so
    and the file is at the current version), served, and a client on it."""
    db = database_with_one_host(tmp_path, schema)
    cmd = [sys.executable, "-m", "portmesh.store", "upgrade", str(db)]
    assert subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip() == "converted"
    version = subprocess.run(["ovsdb-tool", "db-version", str(db)], check=True, capture_output=True, text=True)
    assert version.stdout.strip() == json.loads(schema_path().read_text())["version"]
    pid = start_server(db, tmp_path / "store.sock", create=False)
    try:
        with Store(f"unix:{tmp_path / 'store.sock'}", timeout=10) as store:
            yield store
    finally:
        stop_server(pid)
