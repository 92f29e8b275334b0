"""Traffic tools the lab tests run inside lab namespaces (``python clients.py MODE ...``).

Every mode is bounded in count and time and prints one JSON object: what was
sent, what came back, and from which addresses, so the test can assert on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import sys
import time


def parse_line(raw: bytes) -> dict[str, str]:
    """``name=N client=IP:PORT local=IP:PORT`` → dict."""
    return dict(part.split("=", 1) for part in raw.decode().split())


async def _tcp_one(host: str, port: int, bind: str | None, hold: float) -> dict[str, str]:
    local_addr = (bind, 0) if bind else None
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, local_addr=local_addr), 5)
    try:
        data = await asyncio.wait_for(reader.readline(), 5)
        mine = writer.get_extra_info("sockname")
        info = parse_line(data)
        info["my_port"] = str(mine[1])
        await asyncio.sleep(hold)  # keep every connection open at once
        return info
    finally:
        writer.close()


async def tcp_many(host: str, port: int, count: int, bind: str | None, hold: float) -> dict[str, object]:
    results = await asyncio.gather(*(_tcp_one(host, port, bind, hold) for _ in range(count)), return_exceptions=True)
    ok = [r for r in results if isinstance(r, dict)]
    errors = [repr(r) for r in results if not isinstance(r, dict)]
    return {"ok": len(ok), "errors": errors[:5], "replies": ok}


def udp_many(host: str, port: int, count: int, bind: str | None) -> dict[str, object]:
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((bind or "0.0.0.0", 0))
        s.settimeout(3)
        s.sendto(b"hello\n", (host, port))
        socks.append(s)
    replies, errors = [], []
    for s in socks:
        try:
            data, _ = s.recvfrom(512)
            info = parse_line(data)
            info["my_port"] = str(s.getsockname()[1])
            replies.append(info)
        except OSError as exc:
            errors.append(repr(exc))
        finally:
            s.close()
    return {"ok": len(replies), "errors": errors[:5], "replies": replies}


def tcp_refused(host: str, port: int) -> dict[str, object]:
    start = time.monotonic()
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((host, port))
        outcome = "connected"
    except ConnectionRefusedError:
        outcome = "refused"
    except TimeoutError:
        outcome = "timeout"
    except OSError as exc:
        outcome = f"error:{exc.errno}"
    finally:
        s.close()
    return {"outcome": outcome, "seconds": time.monotonic() - start}


def udp_refused(host: str, port: int) -> dict[str, object]:
    start = time.monotonic()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.connect((host, port))
    try:
        s.send(b"hello\n")
        s.recv(512)
        outcome = "answered"
    except ConnectionRefusedError:
        outcome = "refused"
    except TimeoutError:
        outcome = "timeout"
    finally:
        s.close()
    return {"outcome": outcome, "seconds": time.monotonic() - start}


def raw_send(ifname: str, frames_hex: list[str]) -> dict[str, object]:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((ifname, 0))
    for frame in frames_hex:
        s.send(bytes.fromhex(frame))
    s.close()
    return {"sent": len(frames_hex)}


def sniff(ifname: str, ethertype: int, seconds: float) -> dict[str, object]:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
    s.bind((ifname, 0))
    s.settimeout(0.2)
    seen = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            frame = s.recv(2048)
        except TimeoutError:
            continue
        if struct.unpack("!H", frame[12:14])[0] == ethertype:
            seen += 1
    return {"frames": seen}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["tcp", "udp", "tcp-refused", "udp-refused", "raw-send", "sniff"])
    ap.add_argument("--host", default="")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--bind")
    ap.add_argument("--hold", type=float, default=0.0)
    ap.add_argument("--ifname", default="eth0")
    ap.add_argument("--ethertype", type=lambda v: int(v, 0), default=0x0806)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("frames", nargs="*")
    a = ap.parse_intermixed_args()
    if a.mode == "tcp":
        out: dict[str, object] = asyncio.run(tcp_many(a.host, a.port, a.count, a.bind, a.hold))
    elif a.mode == "udp":
        out = udp_many(a.host, a.port, a.count, a.bind)
    elif a.mode == "tcp-refused":
        out = tcp_refused(a.host, a.port)
    elif a.mode == "udp-refused":
        out = udp_refused(a.host, a.port)
    elif a.mode == "raw-send":
        out = raw_send(a.ifname, a.frames)
    else:
        out = sniff(a.ifname, a.ethertype, a.seconds)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
