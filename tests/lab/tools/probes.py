"""Recorders and probes the isolation tests run inside lab namespaces (``python probes.py MODE ...``);
frames are sent with clients.py ``raw-send``.

Servers and sniffers print one line ``READY`` on stdout once their socket is
open, so the test starts sending only then (no sleeping for readiness); each
then prints one JSON object with what it saw, and every mode is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import sys
import time


def ready() -> None:
    sys.stdout.write("READY\n")
    sys.stdout.flush()


def udp_record(port: int, end: str, seconds: float) -> dict[str, object]:
    """Record every datagram to ``port`` until one whose payload is ``end`` arrives (or ``seconds`` pass)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    s.settimeout(0.2)
    ready()
    heard: list[dict[str, object]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            data, (ip, sport) = s.recvfrom(2048)
        except TimeoutError:
            continue
        text = data.decode(errors="replace")
        heard.append({"payload": text, "src": f"{ip}:{sport}"})
        if text == end:
            break
    return {"heard": heard}


def arp_record(ifname: str, until_sha: str, grace: float, seconds: float) -> dict[str, object]:
    """Record the sender MAC of every ARP reply on ``ifname``; stop ``grace`` s after one from ``until_sha``."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    s.bind((ifname, 0))
    s.settimeout(0.05)
    ready()
    replies: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            frame = s.recv(2048)
        except TimeoutError:
            continue
        if len(frame) < 42 or struct.unpack("!H", frame[12:14])[0] != 0x0806 or struct.unpack("!H", frame[20:22])[0] != 2:
            continue
        sha = ":".join(f"{b:02x}" for b in frame[22:28])
        replies.append(sha)
        if sha == until_sha.lower():
            # A second answer (the host kernel's) would come at once; the switch's is what we wait for.
            deadline = min(deadline, time.monotonic() + grace)
    return {"replies": replies}


def tcp_serve(bind: str, port: int) -> None:
    """A TCP server that greets each client with ``hello from <bind>``; runs until killed."""

    async def main() -> None:
        async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(f"hello from {bind}\n".encode())
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(greet, bind, port, reuse_address=True)
        ready()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


async def _probe(host: str, port: int, timeout: float) -> dict[str, object]:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError:
        return {"target": f"{host}:{port}", "outcome": "timeout"}
    except ConnectionRefusedError:
        return {"target": f"{host}:{port}", "outcome": "refused"}
    except OSError as exc:
        return {"target": f"{host}:{port}", "outcome": f"error:{exc.errno}"}
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError:
        line = b""
    writer.close()
    return {"target": f"{host}:{port}", "outcome": "connected", "greeting": line.decode().strip()}


def tcp_probe(targets: list[str], timeout: float) -> dict[str, object]:
    """Try every ``IP:PORT`` at once; each one's outcome (connected, refused, timeout, error:N)."""

    async def main() -> list[dict[str, object]]:
        pairs = [t.rsplit(":", 1) for t in targets]
        return await asyncio.gather(*(_probe(h, int(p), timeout) for h, p in pairs))

    return {"results": asyncio.run(main())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["udp-record", "arp-record", "tcp-serve", "tcp-probe"])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--bind", default="0.0.0.0")
    ap.add_argument("--end", default="END")
    ap.add_argument("--ifname", default="eth0")
    ap.add_argument("--until-sha", default="")
    ap.add_argument("--grace", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("args", nargs="*")
    a = ap.parse_intermixed_args()
    if a.mode == "tcp-serve":
        tcp_serve(a.bind, a.port)
        return
    if a.mode == "udp-record":
        out = udp_record(a.port, a.end, a.seconds)
    elif a.mode == "arp-record":
        out = arp_record(a.ifname, a.until_sha, a.grace, a.seconds)
    else:
        out = tcp_probe(a.args, a.timeout)
    json.dump(out, sys.stdout)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
