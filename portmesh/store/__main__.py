"""``python -m portmesh.store``: create the database and serve it (the lab and the systemd unit run it).

Standalone: ``serve --db F --socket S [--tcp IP:PORT]`` creates ``F`` if it is missing.
Raft: ``create-cluster --db F --local tcp:IP:PORT`` on the first member, ``join-cluster --db F
--local tcp:IP:PORT --remote tcp:IP:PORT[,...]`` on each other one, then ``serve`` on every
member (its ``--tcp`` for clients must differ from ``--local``, the cluster's own port).

``serve`` replaces itself with ``ovsdb-server`` (exec), so the PID the caller
started is the server's own PID and stopping it by that PID stops the server.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from portmesh.store.rows import schema_path
from portmesh.store.server import (
    claim_blocks,
    create_cluster,
    create_db,
    init_config,
    join_cluster,
    server_command,
    server_env,
    upgrade,
    upgrade_db,
)


def _address(value: str) -> str:
    """A cluster member's address as ovsdb-tool takes it: ``tcp:IP:PORT`` (or ``ssl:``)."""
    kind, _, rest = value.partition(":")
    ip, _, port = rest.rpartition(":")
    if kind not in ("tcp", "ssl") or not ip or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not tcp:IP:PORT")
    return value


def _addresses(value: str) -> list[str]:
    return [_address(part.strip()) for part in value.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it."""
    parser = argparse.ArgumentParser(prog="python -m portmesh.store", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="create the db if missing (convert it if older), then exec ovsdb-server in the foreground"
    )
    serve.add_argument("--db", required=True, type=Path, help="database file")
    serve.add_argument("--socket", required=True, type=Path, help="unix socket to listen on")
    serve.add_argument("--tcp", help="also listen on IP:PORT")
    serve.add_argument("--pidfile", type=Path, help="where ovsdb-server writes its PID")
    serve.add_argument("--log-file", type=Path, help="log file (default: next to the socket)")
    create = sub.add_parser("create", help="create the database file from the schema")
    create.add_argument("--db", required=True, type=Path)
    claim = sub.add_parser(
        "claim-blocks", help="claim the port blocks of containers that have none (after converting a cluster online)"
    )
    claim.add_argument("target", help="database file, or a server's remote (unix:PATH, tcp:IP:PORT)")
    up = sub.add_parser(
        "upgrade",
        help="convert a database to this schema: a file offline, or a running cluster online through one member",
    )
    up.add_argument("target", help="database file, or a server's remote (unix:PATH, tcp:IP:PORT)")
    init = sub.add_parser(
        "init-config", help="write the default config into a Global row without one (after converting a cluster online)"
    )
    init.add_argument("target", help="database file, or a server's remote (unix:PATH, tcp:IP:PORT)")
    first = sub.add_parser("create-cluster", help="create the database as the first member of a new Raft cluster")
    first.add_argument("--db", required=True, type=Path, help="database file to create")
    first.add_argument("--local", required=True, type=_address, help="this member's cluster address, tcp:IP:PORT")
    join = sub.add_parser("join-cluster", help="create the database as a member joining a Raft cluster")
    join.add_argument("--db", required=True, type=Path, help="database file to create")
    join.add_argument("--local", required=True, type=_address, help="this member's cluster address, tcp:IP:PORT")
    join.add_argument(
        "--remote", required=True, type=_addresses, help="cluster address(es) of existing members, tcp:IP:PORT[,...]"
    )
    sub.add_parser("schema", help="print the schema's path")
    args = parser.parse_args(argv)

    if args.command == "schema":
        print(schema_path())
        return 0
    if args.command == "claim-blocks":
        print(f"{claim_blocks(args.target)} port block claims written")
        return 0
    if args.command == "upgrade":
        print("converted" if upgrade(args.target) else "already current")
        return 0
    if args.command == "init-config":
        print("default config written" if init_config(args.target) else "config already set")
        return 0
    if args.command in ("create", "create-cluster", "join-cluster"):
        if args.db.exists():
            parser.error(f"--db: {args.db} already exists")
        try:
            if args.command == "create":
                create_db(args.db)
            elif args.command == "create-cluster":
                create_cluster(args.db, args.local)
            else:
                join_cluster(args.db, args.local, args.remote)
        except subprocess.CalledProcessError as exc:
            detail = (exc.stderr or "").strip().splitlines()
            print(f"{args.command}: {detail[-1] if detail else exc}", file=sys.stderr)
            return 1
        return 0
    if not args.db.exists():
        create_db(args.db)
    else:
        upgrade_db(args.db)  # a database kept from an older schema: converted, its containers' blocks claimed
    if args.socket.exists():
        args.socket.unlink()
    cmd = server_command(args.db, args.socket, tcp=args.tcp, pidfile=args.pidfile, log_file=args.log_file)
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, server_env(args.socket))


if __name__ == "__main__":
    sys.exit(main())
