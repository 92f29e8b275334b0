"""``python -m portmesh.controller``: the OpenFlow controller process."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable

import prometheus_client

from portmesh.controller.service import Controller
from portmesh.store.reader import StateReader

log = logging.getLogger("portmesh.controller")

# The OVSDB lock every controller instance asks for; its holder is master (see portmesh/controller/roles.py).
LOCK = "portmesh_controller"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m portmesh.controller", description=__doc__)
    ap.add_argument("--store", required=True, help="state store remote, e.g. unix:/run/portmesh/lab/store.sock")
    ap.add_argument("--listen", default="tcp:127.0.0.1:6653", help="tcp:IP:PORT or unix:PATH for switches")
    ap.add_argument("--metrics", help="serve Prometheus metrics on ADDR:PORT (e.g. 127.0.0.1:9470)")
    ap.add_argument("--echo-idle", type=float, default=5.0, metavar="SECONDS",
                    help="send a switch an echo request after this long without a message from it (0: never)")
    ap.add_argument("--echo-timeout", type=float, default=5.0, metavar="SECONDS",
                    help="drop a switch's connection when an echo request gets no answer within this long")
    ap.add_argument("--name", default=socket.gethostname(),
                    help="this instance's name in logs, metrics and the store's controller_master (default: hostname)")
    ap.add_argument("--log-level", default="INFO")
    return ap.parse_args(argv)


async def supervise(main: Awaitable[None], stop: asyncio.Event, is_serving: Callable[[], bool] = lambda: True) -> str | None:
    """Wait for ``stop`` while watching the main task; return why it died, or None on a requested stop.

    Why: a controller whose converge loop died would keep every switch connection open while
    programming nothing, so no supervisor (systemd Restart=on-failure, the lab) would ever restart
    it. Its death (an exception, or a return, which a forever-loop never does) is a reason to exit
    non-zero; so is the switch listener closing under us (checked every second).
    """
    task = asyncio.ensure_future(main)
    stopper = asyncio.ensure_future(stop.wait())
    why: str | None = None
    try:
        while why is None and not stop.is_set():
            done, _ = await asyncio.wait({task, stopper}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                exc = task.exception() if not task.cancelled() else None
                why = f"main task died: {type(exc).__name__}: {exc}" if exc is not None else "main task ended"
                if exc is not None:
                    log.error("%s", why, exc_info=exc)
            elif not stop.is_set() and not is_serving():
                why = "the switch listener stopped serving"
    finally:
        for t in (task, stopper):
            t.cancel()
    return why


async def serve(args: argparse.Namespace) -> None:
    # The desired state through a lean monitor, not the IDL client: at 100,000 mappings the IDL's
    # replica alone was ~200 MB and ~6 s of loading on top of the state itself (store/reader.py).
    # It also holds the election's lock: every status write asserts it (store/reader.py).
    store = StateReader(args.store, lock=LOCK)
    # The network config comes with every snapshot (the store's Global row), never from here.
    controller = Controller(store, echo_idle=args.echo_idle, echo_timeout=args.echo_timeout,
                            election=store, name=args.name)
    if args.metrics:
        addr, _, port = args.metrics.rpartition(":")
        prometheus_client.start_http_server(int(port), addr or "127.0.0.1", registry=controller.metrics.registry)
    # Listen before loading the store: a restarted controller's switches reconnect, handshake and
    # hand over their cookies while the state loads (0.5-1 s at 1,000 mappings, seconds at 100,000),
    # instead of after it. Until the store is loaded and the lock is ours this instance is no master,
    # so a switch that comes early is only read (and asked SLAVE); it is synced on promotion.
    kind, _, where = args.listen.partition(":")
    if kind == "tcp":
        host, _, port = where.rpartition(":")
        server = await asyncio.start_server(controller.handle_switch, host, int(port))
    elif kind == "unix":
        server = await asyncio.start_unix_server(controller.handle_switch, where)
    else:
        raise SystemExit(f"--listen: {args.listen!r} is neither tcp:IP:PORT nor unix:PATH")
    log.info("%s listening for switches on %s", args.name, args.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await asyncio.to_thread(store.start)
        controller.attach()
        why = await supervise(controller.run(), stop, server.is_serving)
    # Either way the switches are let go (they keep their flows, fail-secure) and the store is closed.
    await controller.close()
    store.close()
    if why is not None:
        log.error("controller exits with status 1 so its supervisor restarts it: %s", why)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.echo_idle < 0 or args.echo_timeout <= 0:
        raise SystemExit("--echo-idle must be >= 0 and --echo-timeout > 0 (seconds)")
    # A compile allocates hundreds of thousands of small immutable objects that live on; the default
    # generation-0 threshold (700) makes the collector rescan them over and over (~40 % of a 100k compile).
    gc.set_threshold(100_000, 50, 100)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
