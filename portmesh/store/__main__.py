"""``python -m portmesh.store``: create the database and serve it (used by the lab).

``serve`` replaces itself with ``ovsdb-server`` (exec), so the PID the caller
started is the server's own PID and stopping it by that PID stops the server.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from portmesh.store.rows import schema_path
from portmesh.store.server import claim_blocks, create_db, server_command, server_env, upgrade_db


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
    sub.add_parser("schema", help="print the schema's path")
    args = parser.parse_args(argv)

    if args.command == "schema":
        print(schema_path())
        return 0
    if args.command == "claim-blocks":
        print(f"{claim_blocks(args.target)} port block claims written")
        return 0
    if args.command == "create":
        create_db(args.db)
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
