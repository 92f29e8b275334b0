"""Traffic endpoints for bench/dataplane: a tiny HTTP server and two bounded clients.

Why our own instead of curl/wrk: the same server program runs behind every path
(direct veth, bridge + DNAT, OVS ct(nat), portmesh), so differences come from the
path and not from the endpoint; and the clients are bounded in count *and* time, so
a broken path ends a run instead of hanging it. Only the standard library is used,
so the script runs with any Python 3.11 inside any namespace.

  python dataplane_tools.py server --port 80
  python dataplane_tools.py rr  --host H --port P [--count N --seconds S]   # latency
  python dataplane_tools.py cps --host H --port P [--count N --seconds S]   # new conns/s

``--host`` may list several addresses (``H1,H2,H3``): cps opens its connections to them in turn,
rr uses the first.

Each client prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import socket
import sys
import time

REQ_KEEPALIVE = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
REQ_CLOSE = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
BODY = b"ok\n"
RESP_KEEPALIVE = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n" + BODY
RESP_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\n" + BODY


class _HttpServer(asyncio.Protocol):
    """Minimal HTTP/1.1: answers every request, keeps the connection unless told to close.

    A Protocol (not streams) keeps the per-connection Python cost low, so the
    connection-rate figure measures the path more than the endpoint.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            req, _, self.buf = self.buf.partition(b"\r\n\r\n")
            if b"connection: close" in req.lower():
                self.transport.write(RESP_CLOSE)
                self.transport.close()
                return
            self.transport.write(RESP_KEEPALIVE)


async def _serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_HttpServer, host="0.0.0.0", port=port, backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


def run_rr(host: str, port: int, count: int, seconds: float, warmup: int = 100) -> dict[str, object]:
    """Request/response round trips over one kept-alive TCP connection (netperf TCP_RR style).

    Uses the established-connection path only, so it measures per-packet latency of
    the datapath, not connection setup (that is what `cps` is for).
    """
    lat_us: list[float] = []
    deadline = time.monotonic() + seconds
    with socket.create_connection((host, port), timeout=2.0) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        need = len(RESP_KEEPALIVE)
        for i in range(warmup + count):
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter_ns()
            s.sendall(REQ_KEEPALIVE)
            got = 0
            while got < need:
                chunk = s.recv(4096)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                got += len(chunk)
            t1 = time.perf_counter_ns()
            if i >= warmup:
                lat_us.append((t1 - t0) / 1000.0)
    if not lat_us:
        raise RuntimeError("no round trips completed")
    lat_us.sort()

    def pct(p: float) -> float:
        return lat_us[min(len(lat_us) - 1, round(p / 100.0 * (len(lat_us) - 1)))]

    return {
        "samples": len(lat_us),
        "rtt_ms_p50": round(pct(50) / 1000.0, 4),
        "rtt_ms_p99": round(pct(99) / 1000.0, 4),
        "rtt_ms_min": round(lat_us[0] / 1000.0, 4),
    }


class _OneShot(asyncio.Protocol):
    """Send one `Connection: close` request, succeed when a 200 arrives and the server closes."""

    def __init__(self, done: asyncio.Future[bool]) -> None:
        self.done = done
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(REQ_CLOSE)

    def data_received(self, data: bytes) -> None:
        self.buf += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.buf.startswith(b"HTTP/1.1 200"))


async def _cps(hosts: list[str], port: int, count: int, seconds: float, concurrency: int) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    ok = 0
    failed = 0
    started = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal ok, failed, started
        while started < count and time.monotonic() < deadline:
            host = hosts[started % len(hosts)]  # in turn: each of several targets gets an equal share
            started += 1
            done: asyncio.Future[bool] = loop.create_future()
            transport = None
            try:
                async with asyncio.timeout(2.0):
                    transport, _ = await loop.create_connection(functools.partial(_OneShot, done), host, port)
                    good = await done
            except (OSError, TimeoutError):
                good = False
            finally:
                if transport is not None:
                    transport.close()
            if good:
                ok += 1
            else:
                failed += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - t0
    return {
        "connections": ok,
        "failed": failed,
        "seconds": round(elapsed, 3),
        "concurrency": concurrency,
        "conn_per_s": round(ok / elapsed, 1) if elapsed > 0 else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("server")
    s.add_argument("--port", type=int, default=80)
    for name, count, secs in (("rr", 3000, 5.0), ("cps", 20000, 3.0)):
        c = sub.add_parser(name)
        c.add_argument("--host", required=True)
        c.add_argument("--port", type=int, required=True)
        c.add_argument("--count", type=int, default=count)
        c.add_argument("--seconds", type=float, default=secs)
        c.add_argument("--concurrency", type=int, default=32)
    a = p.parse_args(argv)
    if a.mode == "server":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(a.port))
        return 0
    hosts = a.host.split(",")
    if a.mode == "rr":
        out = run_rr(hosts[0], a.port, a.count, a.seconds)
    else:
        out = asyncio.run(_cps(hosts, a.port, a.count, a.seconds, a.concurrency))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
