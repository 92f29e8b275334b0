"""Create the Portmesh database and run a standalone ``ovsdb-server`` for it.

Used by the lab and the tests. The server daemonizes and is stopped by the
PID it was given back, never by name, so nothing else on the machine is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from portmesh.model.config import DEFAULT_CONFIG
from portmesh.store.rows import config_json, schema_path

# The first schema whose Global row holds the cloud's configuration.
CONFIG_VERSION = (1, 4, 0)


def create_db(db: Path | str, schema: Path | str | None = None) -> Path:
    """Create ``db`` from the Portmesh schema with ``ovsdb-tool create`` (it must not exist yet), with its
    Global row holding the default configuration (generation 0)."""
    db = Path(db)
    subprocess.run(
        ["ovsdb-tool", "create", str(db), str(schema or schema_path())],
        check=True,
        capture_output=True,
        text=True,
    )
    if _version(db) >= CONFIG_VERSION:  # tests create older databases with older schemas
        init_config(db)
    return db


def create_cluster(db: Path | str, local: str) -> Path:
    """Create ``db`` as the first member of a new Raft cluster reachable by the others at ``local``
    (``tcp:IP:PORT``), holding what a new standalone database holds (the default configuration).

    ``ovsdb-tool create-cluster`` takes its contents from a standalone database: one is made
    next to ``db`` with :func:`create_db`, then removed."""
    db = Path(db)
    seed = db.with_name(f".{db.name}.seed")
    seed.unlink(missing_ok=True)
    try:
        create_db(seed)
        subprocess.run(
            ["ovsdb-tool", "create-cluster", str(db), str(seed), local], check=True, capture_output=True, text=True
        )
    finally:
        seed.unlink(missing_ok=True)
    return db


def join_cluster(db: Path | str, local: str, remotes: list[str]) -> Path:
    """Create ``db`` as a new member that joins the Raft cluster at ``remotes`` (any of its members'
    ``tcp:IP:PORT``); it takes the data from the cluster once its server runs."""
    db = Path(db)
    subprocess.run(
        ["ovsdb-tool", "join-cluster", str(db), "Portmesh", local, *remotes], check=True, capture_output=True, text=True
    )
    return db


def _version(db: Path | str) -> tuple[int, ...]:
    out = subprocess.run(["ovsdb-tool", "db-version", str(db)], check=True, capture_output=True, text=True).stdout
    return tuple(int(part) for part in out.strip().split("."))


def init_config(target: Path | str) -> bool:
    """Write the default configuration into a Global row that has none; True if it wrote.

    ``target``: a standalone database file or a server's remote. A database from before schema
    1.4.0 gains the config columns empty on conversion, and an empty ``public_pools`` means "no
    pools": so the defaults are written explicitly, once (a row with a ``gateway_ip`` has been
    configured and is left alone), and hosts without a role become gateways, as they were.
    """
    (found,) = (
        reply["rows"]
        for reply in _run_ops(
            target,
            "query" if not _is_remote(target) else "transact",
            [{"op": "select", "table": "Global", "where": [], "columns": ["gateway_ip"]}],
        )
    )
    ops: list[dict[str, Any]] = []
    if not found:
        ops.append({"op": "insert", "table": "Global", "row": {"generation": 0, **config_json(DEFAULT_CONFIG)}})
    elif not _ovsdb_set(found[0]["gateway_ip"]):
        ops.append({"op": "update", "table": "Global", "where": [], "row": config_json(DEFAULT_CONFIG)})
    if not ops:
        return False
    ops.append({"op": "update", "table": "Host", "where": [["role", "==", ["set", []]]], "row": {"role": "gateway"}})
    _run_ops(target, "transact", ops)
    return True


def upgrade_db(db: Path | str, schema: Path | str | None = None) -> bool:
    """Convert a standalone ``db`` made with an older Portmesh schema, in place; True if it was converted.

    A schema that gains a column (1.2.0: ``Host.switch_waiting``) would otherwise make every
    write naming that column fail against a database kept from before the upgrade; one that
    gains the ``Block`` table (1.3.0) needs the existing containers' blocks claimed in it, and
    one that gains the configuration (1.4.0) needs the defaults written (:func:`init_config`).
    ``ovsdb-tool convert`` keeps every row; a clustered database is left alone (it is
    converted online with ``ovsdb-client convert``).
    """
    schema = str(schema or schema_path())
    check = subprocess.run(["ovsdb-tool", "needs-conversion", str(db), schema], capture_output=True, text=True)
    if check.returncode != 0 or check.stdout.strip() != "yes":
        return False
    subprocess.run(["ovsdb-tool", "convert", str(db), schema], check=True, capture_output=True, text=True)
    claim_blocks(db)
    if _version(db) >= CONFIG_VERSION:
        init_config(db)
    return True


def upgrade(target: Path | str, schema: Path | str | None = None) -> bool:
    """Bring a database to the current schema, with everything a conversion needs after it; True if converted.

    A file: :func:`upgrade_db` (offline). A running server's remote (a Raft cluster's member,
    ``tcp:IP:PORT``): ``ovsdb-client convert`` online (the cluster converts as one), then the
    port-block claims and the default config it may lack. Idempotent.
    """
    if not _is_remote(target):
        return upgrade_db(target, schema)
    schema = str(schema or schema_path())
    check = subprocess.run(
        ["ovsdb-client", "needs-conversion", str(target), schema], check=True, capture_output=True, text=True
    )
    converted = check.stdout.strip() == "yes"
    if converted:
        subprocess.run(["ovsdb-client", "convert", str(target), schema], check=True, capture_output=True, text=True)
    claim_blocks(target)
    init_config(target)
    return converted


def _ovsdb_set(value: Any) -> list[Any]:
    """An OVSDB set in JSON: a bare atom for one element, ``["set", [...]]`` otherwise."""
    if isinstance(value, list) and len(value) == 2 and value[0] == "set":
        return list(value[1])
    return [value]


def _is_remote(target: Path | str) -> bool:
    return str(target).startswith(("unix:", "tcp:", "ssl:"))


def _run_ops(target: Path | str, verb: str, ops: list[dict[str, Any]]) -> list[Any]:
    """Run ``ops`` as one transaction on a database file (``ovsdb-tool``) or a running server (``ovsdb-client``)."""
    tool = "ovsdb-client" if _is_remote(target) else "ovsdb-tool"
    out = subprocess.run(
        [tool, verb, str(target), json.dumps(["Portmesh", *ops])], check=True, capture_output=True, text=True
    ).stdout
    replies: list[Any] = json.loads(out)
    failed = [reply for reply in replies if isinstance(reply, dict) and "error" in reply]
    if failed:
        raise RuntimeError(f"{verb} on {target} failed: {failed[0]}")
    return replies


def claim_blocks(target: Path | str) -> int:
    """Claim in the ``Block`` table the port block of every container that has no claim yet; return
    how many claims were written. ``target``: a standalone database file (offline, as
    :func:`upgrade_db` does) or a server's remote (``unix:``/``tcp:``, e.g. a Raft cluster's
    member after ``ovsdb-client convert``).

    A database kept from before schema 1.3.0 holds containers but no claims; without them a new
    container could be given a block already in use. Should such a database hold the same block
    twice on one IP (the race the index now closes), the first container by name keeps the claim.
    """
    containers, claims = (
        reply["rows"]
        for reply in _run_ops(
            target,
            "query" if not _is_remote(target) else "transact",
            [
                {"op": "select", "table": "Container", "where": [], "columns": ["name", "ips", "block_start"]},
                {"op": "select", "table": "Block", "where": [], "columns": ["public_ip", "block_start"]},
            ],
        )
    )
    claimed = {(row["public_ip"], row["block_start"]) for row in claims}
    inserts: list[dict[str, Any]] = []
    for row in sorted(containers, key=lambda r: str(r["name"])):
        for ip in _ovsdb_set(row["ips"]):
            claim = (ip, row["block_start"])
            if claim not in claimed:
                claimed.add(claim)
                inserts.append(
                    {"op": "insert", "table": "Block",
                     "row": {"public_ip": ip, "block_start": row["block_start"], "container": row["name"]}}
                )
    if inserts:
        _run_ops(target, "transact", inserts)
    return len(inserts)


def server_command(
    db: Path | str,
    socket: Path | str,
    *,
    tcp: str | None = None,
    pidfile: Path | str | None = None,
    log_file: Path | str | None = None,
) -> list[str]:
    """The ``ovsdb-server`` command line for ``db`` on unix ``socket`` (and ``tcp`` = ``ip:port``)."""
    socket = Path(socket)
    cmd = [
        "ovsdb-server",
        str(db),
        f"--remote=punix:{socket}",
        f"--unixctl={socket.with_suffix('.ctl')}",
        f"--log-file={log_file or socket.with_suffix('.log')}",
        "--no-chdir",
    ]
    if tcp:
        ip, _, port = tcp.rpartition(":")
        cmd.append(f"--remote=ptcp:{port}:{ip}" if ip else f"--remote=ptcp:{port}")
    if pidfile:
        cmd.append(f"--pidfile={pidfile}")
    return cmd


def server_env(socket: Path | str) -> dict[str, str]:
    """Environment for our ovsdb-server: its own OVS_RUNDIR, so it never looks in /var/run/openvswitch."""
    rundir = str(Path(socket).parent)
    return {**os.environ, "OVS_RUNDIR": rundir, "OVS_DBDIR": rundir, "OVS_LOGDIR": rundir}


def start_server(
    db: Path | str,
    socket: Path | str,
    *,
    tcp: str | None = None,
    pidfile: Path | str | None = None,
    log_file: Path | str | None = None,
    create: bool = True,
    timeout: float = 10.0,
) -> int:
    """Start ``ovsdb-server`` for ``db`` (created first if missing and ``create``, converted to the
    current schema if made with an older one); return its PID.

    The server daemonizes (``--detach``): the call returns once it is listening,
    and it outlives the caller, as the lab needs. Its PID is read from
    ``pidfile`` (default: next to the socket).
    """
    db, socket = Path(db), Path(socket)
    pidfile = Path(pidfile) if pidfile else socket.with_suffix(".pid")
    if create and not db.exists():
        create_db(db)
    elif db.exists():
        upgrade_db(db)
    with contextlib.suppress(FileNotFoundError):
        socket.unlink()  # a stale socket from a killed server
    cmd = [*server_command(db, socket, tcp=tcp, pidfile=pidfile, log_file=log_file), "--detach"]
    result = subprocess.run(cmd, env=server_env(socket), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"ovsdb-server for {db} failed: {result.stderr.strip()}")
    return int(pidfile.read_text().strip())


def _reap(pid: int) -> bool:
    """True once ``pid`` is gone (reaping it if it is our child)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:  # not our child (it daemonized): exited once gone or a zombie
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return True
        return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def stop_server(pid: int, timeout: float = 5.0) -> None:
    """Stop the server with this PID: SIGTERM, then SIGKILL after ``timeout``. Quiet if already gone."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            _reap(pid)
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if _reap(pid):
                return
            time.sleep(0.01)
    raise RuntimeError(f"ovsdb-server {pid} did not exit")
