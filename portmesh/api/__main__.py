"""``python -m portmesh.api --store REMOTE --listen IP:PORT [--token-file PATH]``.

Connects to the state store, then serves the HTTP API with uvicorn on one
event loop. The API listens on loopback by default: it is the machine's control
point, and writes need the bearer token as well.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvicorn

from portmesh.api.app import create_app
from portmesh.api.progress import AGENT_LEASE, AGENT_SILENCE
from portmesh.api.token import DEFAULT_TOKEN_FILE, load_or_create_token

log = logging.getLogger("portmesh.api")


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) → (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def positive_seconds(value: str) -> float:
    """argparse type for --agent-lease: a positive, finite number of seconds."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} must be a positive, finite number of seconds")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m portmesh.api", description=__doc__)
    parser.add_argument("--store", required=True, help="state store remote: unix:PATH or tcp:IP:PORT[,...]")
    parser.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 8470), help="HOST:PORT to serve on")
    parser.add_argument("--token-file", type=Path, default=DEFAULT_TOKEN_FILE, help="bearer token file")
    parser.add_argument("--wait-timeout", type=float, default=30.0, help="default seconds for ?wait=true")
    parser.add_argument(
        "--agent-silence",
        type=float,
        default=AGENT_SILENCE,
        help="seconds a host's agent may stay behind without progress before writes stop waiting for it "
        "(unless they concern its host) and name it as lagging",
    )
    parser.add_argument(
        "--agent-lease",
        type=positive_seconds,
        default=AGENT_LEASE,
        help="seconds without a heartbeat from a host's agent before it counts as dead: an eBPF host is then "
        "down (writes stop waiting for it, as for a disconnected switch); on OVS it is only reported "
        f"(default {AGENT_LEASE:g}: 3 of the agents' default --heartbeat-interval)",
    )
    parser.add_argument(
        "--log-dir",
        action="append",
        default=[],
        help="a directory whose *.log files the logs endpoint may read, besides the runtimes' usual ones "
        "(an agent's --state-dir/logs elsewhere than /var/lib/portmesh); repeatable",
    )
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")

    token, created = load_or_create_token(args.token_file)
    if created:
        log.info("generated a new API token in %s (mode 0600)", args.token_file)

    # The meeting point; imported late so --help works without the ovs libraries.
    from portmesh.store.client import Store, StoreError

    store = Store(args.store)
    store.start()
    try:
        app = create_app(
            store,
            token,
            wait_timeout=args.wait_timeout,
            agent_silence=args.agent_silence,
            agent_lease=args.agent_lease,
            unavailable=(StoreError,),
            log_dirs=args.log_dir,
        )
        host, port = args.listen
        uvicorn.run(app, host=host, port=port, log_level=args.log_level.lower())
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
