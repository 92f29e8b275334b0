"""Bulk TCP transfer for the multi-host lab tests (``python bulk.py serve|send ...``), bounded in size and time.

``serve`` runs as a container's command: on each ``--whoami`` port it answers as
``portmesh.lab.whoami`` does (one line ``name=N client=IP:PORT local=IP:PORT``), on
``--bulk`` it takes a one-line request, ``up N`` (the client sends N bytes; the server
answers ``got N`` once they all arrived) or ``down N`` (the server sends N bytes and
closes). One process for both, so a stopped container leaves nothing behind.

``await-name`` waits for a moved service to answer from its new place.
``send`` is the client: it prints one JSON object with the bytes moved, the seconds,
the rate and the TCP maximum segment size the connection ended with (path-MTU
discovery lowers it), so a test asserts that full-size segments crossed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time

CHUNK = 256 * 1024
MAX_BYTES = 512 * 1024 * 1024


async def _whoami(name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    client, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
    writer.write(f"name={name} client={client[0]}:{client[1]} local={local[0]}:{local[1]}\n".encode())
    try:
        await writer.drain()
    finally:
        writer.close()


async def _bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        verb, _, count = (await asyncio.wait_for(reader.readline(), 10)).decode().partition(" ")
        size = min(int(count), MAX_BYTES)
        if verb == "up":
            got = 0
            while got < size:
                data = await asyncio.wait_for(reader.read(CHUNK), 30)
                if not data:
                    break
                got += len(data)
            writer.write(f"got {got}\n".encode())
        elif verb == "down":
            block = b"x" * CHUNK
            left = size
            while left > 0:
                writer.write(block[: min(left, CHUNK)])
                left -= min(left, CHUNK)
                await writer.drain()
        await writer.drain()
    except (OSError, ValueError, TimeoutError):
        pass
    finally:
        writer.close()


async def serve(name: str, whoami_ports: list[int], bulk_ports: list[int]) -> None:
    servers = [await asyncio.start_server(lambda r, w: _whoami(name, r, w), "0.0.0.0", p) for p in whoami_ports]
    servers += [await asyncio.start_server(_bulk, "0.0.0.0", p) for p in bulk_ports]
    await asyncio.gather(*(s.serve_forever() for s in servers))


def send(host: str, port: int, size: int, direction: str, timeout: float) -> dict[str, object]:
    """Move ``size`` bytes; ``timeout`` bounds the whole transfer (a stalled one reports what it moved)."""
    start = time.monotonic()
    deadline = start + timeout
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(f"{direction} {size}\n".encode())
        moved = 0
        if direction == "up":
            block = b"y" * CHUNK
            while moved < size and time.monotonic() < deadline:
                n = min(CHUNK, size - moved)
                sock.sendall(block[:n])
                moved += n
            answer = b""
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            while not answer.endswith(b"\n"):
                data = sock.recv(100)
                if not data:
                    break
                answer += data
            confirmed = int(answer.split()[1]) if answer.startswith(b"got ") else -1
        else:
            while time.monotonic() < deadline:
                try:
                    data = sock.recv(CHUNK)
                except TimeoutError:
                    break
                if not data:
                    break
                moved += len(data)
                sock.settimeout(max(0.01, deadline - time.monotonic()))
            confirmed = moved
        mss = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    seconds = time.monotonic() - start
    return {"bytes": moved, "confirmed": confirmed, "seconds": round(seconds, 4),
            "mbit_s": round(moved * 8 / seconds / 1e6, 1), "mss": mss}


def await_name(host: str, port: int, name: str, timeout: float) -> dict[str, object]:
    """Connect again and again (every 5 ms) until the whoami line names ``name``; when, by CLOCK_MONOTONIC.

    The test compares ``at`` with the moment the API reported the container up
    (time.monotonic() is the same clock in every process of the machine).
    """
    deadline = time.monotonic() + timeout
    tries, last = 0, ""
    while time.monotonic() < deadline:
        tries += 1
        try:
            with socket.create_connection((host, port), timeout=0.5) as sock:
                sock.settimeout(0.5)
                line = sock.recv(200).decode()
            last = line.strip()
            if f"name={name} " in line:
                return {"at": time.monotonic(), "tries": tries, "line": last}
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.005)
    return {"at": None, "tries": tries, "line": last}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["serve", "send", "await-name"])
    ap.add_argument("--name", default="bulk")
    ap.add_argument("--whoami", type=int, action="append", default=[])
    ap.add_argument("--bulk", type=int, action="append", default=[])
    ap.add_argument("--host", default="")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--bytes", type=int, default=8 * 1024 * 1024)
    ap.add_argument("--direction", choices=["up", "down"], default="up")
    ap.add_argument("--timeout", type=float, default=30.0)
    a = ap.parse_args()
    if a.mode == "serve":
        asyncio.run(serve(a.name, a.whoami, a.bulk))
        return
    if a.mode == "await-name":
        json.dump(await_name(a.host, a.port, a.name, a.timeout), sys.stdout)
        return
    try:
        out = send(a.host, a.port, min(a.bytes, MAX_BYTES), a.direction, a.timeout)
    except OSError as exc:
        out = {"bytes": 0, "confirmed": -1, "error": repr(exc)}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
