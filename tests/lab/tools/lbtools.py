"""Traffic tools for the load-balancing and firewall lab tests (``python lbtools.py MODE ...``).

``serve`` is a backend container's command: on every ``--tcp`` port each connection gets one
whoami line (``name=N client=IP:PORT local=IP:PORT``, as bulk.py's) and then every line it sends
is echoed back as ``N <line>``, so one server answers both the spread count (read a line, close)
and the long-lived connections (lines exchanged for as long as the test wants). ``--udp`` ports
answer each datagram with the whoami line plus the payload. A control port on 127.0.0.1
(``--control``) takes ``down PORT`` / ``up PORT`` to close and reopen one TCP listener: the
service stops while the container (and its other ports) keep running, as a health check sees it.

The client modes run in inet (or a container), are bounded in count and time, and print one
JSON object (``hold`` prints one per ``report`` command read on stdin). Times are
CLOCK_MONOTONIC, the same clock in every process of the machine, so a test compares them with
its own ``time.monotonic()``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from collections import Counter
from typing import Any


def parse_line(raw: bytes) -> dict[str, str]:
    """``name=N client=IP:PORT local=IP:PORT`` → dict."""
    return dict(part.split("=", 1) for part in raw.decode().split() if "=" in part)


# --- the backend --------------------------------------------------------------------------


class Backend:
    def __init__(self, name: str) -> None:
        self.name = name
        self.listeners: dict[int, asyncio.Server] = {}

    async def talk(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
        try:
            writer.write(f"name={self.name} client={client[0]}:{client[1]} local={local[0]}:{local[1]}\n".encode())
            await writer.drain()
            while line := await reader.readline():
                writer.write(f"{self.name} {line.decode(errors='replace').strip()}\n".encode())
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def listen(self, port: int) -> None:
        if port not in self.listeners:
            self.listeners[port] = await asyncio.start_server(self.talk, "0.0.0.0", port, reuse_address=True)

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        verb, _, port = (await reader.readline()).decode().strip().partition(" ")
        if verb == "down" and int(port) in self.listeners:
            server = self.listeners.pop(int(port))
            server.close()
            await server.wait_closed()
        elif verb == "up":
            await self.listen(int(port))
        writer.write(f"ok {sorted(self.listeners)}\n".encode())
        await writer.drain()
        writer.close()


class UdpWhoami(asyncio.DatagramProtocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram endpoint's transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        local = self.transport.get_extra_info("sockname") if self.transport else ("?", 0)
        line = f"name={self.name} client={addr[0]}:{addr[1]} local={local[0]}:{local[1]} {data.decode(errors='replace')}"
        if self.transport is not None:
            self.transport.sendto(line.encode()[:1400], addr)


async def serve(name: str, tcp: list[int], udp: list[int], control: int) -> None:
    backend = Backend(name)
    for port in tcp:
        await backend.listen(port)
    loop = asyncio.get_running_loop()
    for port in udp:
        await loop.create_datagram_endpoint(lambda: UdpWhoami(name), local_addr=("0.0.0.0", port))
    if control:
        await asyncio.start_server(backend.control, "127.0.0.1", control)
    await asyncio.Event().wait()


def ctl(port: int, command: str) -> dict[str, object]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"{command}\n".encode())
        return {"answer": sock.makefile().readline().strip()}


# --- clients --------------------------------------------------------------------------------


async def _one(host: str, port: int, bind: str | None, timeout: float, sport: int = 0) -> dict[str, str]:
    local_addr = (bind or "0.0.0.0", sport) if bind or sport else None
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, local_addr=local_addr), timeout)
    try:
        info = parse_line(await asyncio.wait_for(reader.readline(), timeout))
        info["my"] = "{}:{}".format(*writer.get_extra_info("sockname")[:2])
        return info
    finally:
        writer.close()


async def _round(
    host: str, port: int, count: int, concurrency: int, bind: str | None, timeout: float, first: int = 0
) -> dict[str, Any]:
    gate = asyncio.Semaphore(concurrency)

    async def bounded(sport: int) -> dict[str, str]:
        async with gate:
            return await _one(host, port, bind, timeout, sport)

    ports = range(first, first + count) if first else [0] * count
    results = await asyncio.gather(*(bounded(p) for p in ports), return_exceptions=True)
    replies = [r for r in results if isinstance(r, dict) and "name" in r]
    errors = Counter(type(r).__name__ if isinstance(r, BaseException) else "no-line"
                     for r in results if not (isinstance(r, dict) and "name" in r))
    # The backend saw the client's own address and port (no NAT on the way): count the ones that did not.
    nat = sum(1 for r in replies if r.get("client") != r["my"])
    return {"ok": len(replies), "errors": dict(errors), "names": dict(Counter(r["name"] for r in replies)),
            "not_real_client": nat, "sample": replies[:2]}


def spread(host: str, port: int, count: int, concurrency: int, bind: str | None, timeout: float) -> dict[str, Any]:
    """``count`` new connections (``concurrency`` at once): which backend answered each."""
    start = time.monotonic()
    out = asyncio.run(_round(host, port, count, concurrency, bind, timeout))
    out["seconds"] = round(time.monotonic() - start, 3)
    return out


def watch(
    host: str, port: int, name: str, present: bool, count: int, timeout: float, limit: float, first: int = 0
) -> dict[str, Any]:
    """Rounds of ``count`` new connections until ``name`` answers (``present``) or until a whole round is
    answered without a failure and without ``name`` (absent). ``at``: when that round started.
    With ``first``, each round's connections come from client ports never used before in the run
    (``first`` on, one per connection), so nothing the switch learned earlier can pin them."""
    deadline = time.monotonic() + limit
    rounds, last = 0, {}
    while time.monotonic() < deadline:
        at = time.monotonic()
        rounds += 1
        fresh = first + (rounds - 1) * count if first else 0
        last = asyncio.run(_round(host, port, count, count, None, timeout, fresh))
        seen = name in last["names"]
        if (present and seen) or (not present and not seen and last["ok"] == count):
            return {"at": at, "rounds": rounds, "last": last}
        time.sleep(0.02)
    return {"at": None, "rounds": rounds, "last": last}


def reach(host: str, port: int, bind: str | None, want: bool, timeout: float, limit: float) -> dict[str, Any]:
    """Try a new connection every ~20 ms until one succeeds (``want``) or one gets no answer within
    ``timeout`` (not ``want``). ``at``: when that attempt started."""
    deadline = time.monotonic() + limit
    tries, last = 0, ""
    while time.monotonic() < deadline:
        at = time.monotonic()
        tries += 1
        outcome = probe(host, port, bind, timeout)["outcome"]
        last = str(outcome)
        if (outcome == "connected") == want and (want or outcome == "timeout"):
            return {"at": at, "done": time.monotonic(), "tries": tries, "outcome": outcome}
        time.sleep(0.02)
    return {"at": None, "tries": tries, "outcome": last}


def probe(host: str, port: int, bind: str | None, timeout: float) -> dict[str, Any]:
    """One connection attempt: connected (with the greeting), refused (a reset), or timeout (no answer)."""
    s = socket.socket()
    s.settimeout(timeout)
    start = time.monotonic()
    try:
        if bind:
            s.bind((bind, 0))
        s.connect((host, port))
        greeting = s.recv(200).decode().strip()
        return {"outcome": "connected", "greeting": greeting, "seconds": time.monotonic() - start}
    except ConnectionRefusedError:
        return {"outcome": "refused", "seconds": time.monotonic() - start}
    except TimeoutError:
        return {"outcome": "timeout", "seconds": time.monotonic() - start}
    except OSError as exc:
        return {"outcome": f"error:{exc.errno}", "seconds": time.monotonic() - start}
    finally:
        s.close()


def from_ports(host: str, port: int, first: int, count: int, timeout: float) -> dict[str, Any]:
    """One connection from each source port ``first .. first+count-1`` (one after the other): the
    backend that answered, or the outcome (refused, timeout). A port whose attempt was refused has no
    TIME-WAIT, so the same 5-tuple can be used again at once: a new connection, as far as TCP goes."""
    out: dict[str, str] = {}
    for sport in range(first, first + count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.settimeout(timeout)
        try:
            s.bind(("0.0.0.0", sport))
            s.connect((host, port))
            out[str(sport)] = parse_line(s.recv(200)).get("name", "no-line")
        except ConnectionRefusedError:
            out[str(sport)] = "refused"
        except TimeoutError:
            out[str(sport)] = "timeout"
        except OSError as exc:
            out[str(sport)] = f"error:{exc.errno}"
        finally:
            s.close()
    return {"ports": out}


def udp_stream(host: str, port: int, bind: str | None, count: int, every: float, wait: float, size: int) -> dict[str, Any]:
    """Send ``count`` numbered datagrams of ``size`` payload bytes (at least 13), one every ``every`` s,
    and count the answers (by number)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((bind or "0.0.0.0", 0))
    s.setblocking(False)
    got: set[int] = set()
    names: Counter[str] = Counter()

    def drain() -> None:
        while True:
            try:
                data = s.recv(2048)
            except BlockingIOError:
                return
            parts = data.decode(errors="replace").split()
            if parts and parts[-1].isdigit():
                got.add(int(parts[-1]))
                names[parse_line(data).get("name", "?")] += 1

    start = time.monotonic()
    for i in range(count):
        s.sendto(("p" * max(0, size - 13) + f" seq {i:08d}").encode(), (host, port))
        drain()
        pause = start + (i + 1) * every - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    end = time.monotonic() + wait
    while time.monotonic() < end and len(got) < count:
        drain()
        time.sleep(0.01)
    s.close()
    lost = sorted(set(range(count)) - got)
    return {"sent": count, "answered": len(got), "lost": len(lost), "first_lost": lost[:10],
            "names": dict(names), "start": start, "seconds": round(time.monotonic() - start, 3)}


async def hold(host: str, port: int, count: int, every: float) -> None:
    """Open ``count`` connections and exchange a line on each every ``every`` s for as long as stdin
    stays open. Each stdin line ``report`` prints one JSON line: per connection the backend, the
    lines exchanged and the first failure (if any). ``open N`` opens N more connections."""
    conns: list[dict[str, Any]] = []

    async def one() -> None:
        entry: dict[str, Any] = {"name": None, "exchanged": 0, "broken": None}
        conns.append(entry)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
            info = parse_line(await asyncio.wait_for(reader.readline(), 5))
            entry["name"], entry["client"] = info.get("name"), info.get("client")
            n = 0
            while True:
                n += 1
                writer.write(f"ping {n}\n".encode())
                await writer.drain()
                answer = (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
                if answer != f"{entry['name']} ping {n}":
                    raise ConnectionError(f"answer {answer!r} to ping {n}")
                entry["exchanged"] = n
                await asyncio.sleep(every)
        except (OSError, TimeoutError, ConnectionError) as exc:
            entry["broken"] = f"{type(exc).__name__}: {exc}"[:120]
            entry["broken_at"] = time.monotonic()

    tasks = [asyncio.ensure_future(one()) for _ in range(count)]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while raw := await reader.readline():
        line = raw.decode().strip()
        if not line:
            continue
        if line.startswith("open "):
            tasks += [asyncio.ensure_future(one()) for _ in range(int(line.split()[1]))]
            continue
        sys.stdout.write(json.dumps({"at": time.monotonic(), "conns": conns}) + "\n")
        sys.stdout.flush()
    for task in tasks:
        task.cancel()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["serve", "ctl", "spread", "watch", "reach", "probe", "udp-stream", "hold", "from-ports"])
    ap.add_argument("--name", default="lb")
    ap.add_argument("--tcp", type=int, action="append", default=[])
    ap.add_argument("--udp", type=int, action="append", default=[])
    ap.add_argument("--control", type=int, default=0)
    ap.add_argument("--host", default="")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--bind")
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--limit", type=float, default=30.0)
    ap.add_argument("--every", type=float, default=0.2)
    ap.add_argument("--wait", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=13)
    ap.add_argument("--first-port", type=int, default=40000)
    ap.add_argument("--fresh-port", type=int, default=0, help="watch: client ports from here on, never reused")
    ap.add_argument("--absent", action="store_true")
    ap.add_argument("--closed", action="store_true")
    ap.add_argument("command", nargs="*")
    a = ap.parse_intermixed_args()
    out: dict[str, Any]
    if a.mode == "serve":
        asyncio.run(serve(a.name, a.tcp, a.udp, a.control))
        return
    if a.mode == "hold":
        asyncio.run(hold(a.host, a.port, a.count, a.every))
        return
    if a.mode == "ctl":
        out = ctl(a.control, " ".join(a.command))
    elif a.mode == "spread":
        out = spread(a.host, a.port, a.count, a.concurrency, a.bind, a.timeout)
    elif a.mode == "watch":
        out = watch(a.host, a.port, a.name, not a.absent, a.count, a.timeout, a.limit, a.fresh_port)
    elif a.mode == "reach":
        out = reach(a.host, a.port, a.bind, not a.closed, a.timeout, a.limit)
    elif a.mode == "from-ports":
        out = from_ports(a.host, a.port, a.first_port, a.count, a.timeout)
    elif a.mode == "probe":
        out = probe(a.host, a.port, a.bind, a.timeout)
    else:
        out = udp_stream(a.host, a.port, a.bind, a.count, a.every, a.wait, a.size)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
