"""``python -m portmesh.controller``: the OpenFlow controller process."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal

import prometheus_client

from portmesh.controller.service import Controller
from portmesh.store.reader import StateReader

log = logging.getLogger("portmesh.controller")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m portmesh.controller", description=__doc__)
    ap.add_argument("--store", required=True, help="state store remote, e.g. unix:/run/portmesh/lab/store.sock")
    ap.add_argument("--listen", default="tcp:127.0.0.1:6653", help="tcp:IP:PORT or unix:PATH for switches")
    ap.add_argument("--metrics", help="serve Prometheus metrics on ADDR:PORT (e.g. 127.0.0.1:9470)")
    ap.add_argument("--echo-idle", type=float, default=5.0, metavar="SECONDS",
                    help="send a switch an echo request after this long without a message from it (0: never)")
    ap.add_argument("--echo-timeout", type=float, default=5.0, metavar="SECONDS",
                    help="drop a switch's connection when an echo request gets no answer within this long")
    ap.add_argument("--log-level", default="INFO")
    return ap.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    # The desired state through a lean monitor, not the IDL client: at 100,000 mappings the IDL's
    # replica alone was ~200 MB and ~6 s of loading on top of the state itself (store/reader.py).
    store = StateReader(args.store)
    await asyncio.to_thread(store.start)
    # The network config comes with every snapshot (the store's Global row), never from here.
    controller = Controller(store, echo_idle=args.echo_idle, echo_timeout=args.echo_timeout)
    controller.attach()
    if args.metrics:
        addr, _, port = args.metrics.rpartition(":")
        prometheus_client.start_http_server(int(port), addr or "127.0.0.1", registry=controller.metrics.registry)
    kind, _, where = args.listen.partition(":")
    if kind == "tcp":
        host, _, port = where.rpartition(":")
        server = await asyncio.start_server(controller.handle_switch, host, int(port))
    elif kind == "unix":
        server = await asyncio.start_unix_server(controller.handle_switch, where)
    else:
        raise SystemExit(f"--listen: {args.listen!r} is neither tcp:IP:PORT nor unix:PATH")
    log.info("listening for switches on %s", args.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    converge = asyncio.create_task(controller.run())
    async with server:
        await stop.wait()
    converge.cancel()
    await controller.close()
    store.close()


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
