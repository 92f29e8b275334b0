"""``python tests/ebpf/icmp_probe.py DST PORT [options]``: UDP probes, and the ICMP errors they earn.

Run inside a namespace (a container or ``inet``): sends ``--count`` datagrams of ``--size`` bytes
to DST:PORT with ``--ttl`` (and DF with ``--df``), at least ``--interval`` seconds apart (0: as fast
as the loop goes), from one socket, and listens on a raw ICMP socket for the errors that quote them
(same ports). Collection stops when every probe is accounted for (answered by DST or quoted in an
error) or ``--wait`` seconds after the last send. Prints one JSON line: probes sent, the seconds the
sending took, replies from DST, the errors (count, seconds from the first send to the last one heard,
and the first few as hex with their source), and
what the kernel learnt about the path (``ip route get DST``).
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import struct
import subprocess
import time

IP_MTU_DISCOVER = 10
IP_PMTUDISC_DO = 2
KEEP = 5  # errors kept whole in the answer


def quotes(data: bytes, sport: int, dst: str, dport: int) -> bool:
    """``data`` (IP + ICMP) is an error quoting a datagram of ours: same destination and ports."""
    ihl = (data[0] & 15) * 4
    if len(data) < ihl + 8 + 28 or data[ihl] not in (3, 11):
        return False
    inner = data[ihl + 8:]
    inner_ihl = (inner[0] & 15) * 4
    if len(inner) < inner_ihl + 4 or socket.inet_ntoa(inner[16:20]) != dst:
        return False
    return struct.unpack_from("!HH", inner, inner_ihl) == (sport, dport)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dst")
    ap.add_argument("port", type=int)
    ap.add_argument("--ttl", type=int, default=64)
    ap.add_argument("--size", type=int, default=16, help="UDP payload bytes")
    ap.add_argument("--df", action="store_true")
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--interval", type=float, default=0.0)
    ap.add_argument("--wait", type=float, default=2.0)
    a = ap.parse_args()

    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, a.ttl)
    if a.df:
        udp.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
    udp.bind(("0.0.0.0", 0))  # not connected: a port unreachable must not turn the next send into ECONNREFUSED
    sport = udp.getsockname()[1]
    payload = b"p" * a.size
    sent, send_errors = 0, []
    start = time.monotonic()
    for i in range(a.count):
        if a.interval and i:
            time.sleep(a.interval)  # at least this far apart: a late wake-up never sends a catch-up burst
        try:
            udp.sendto(payload, (a.dst, a.port))
            sent += 1
        except OSError as exc:  # EMSGSIZE once the kernel knows a smaller path MTU
            send_errors.append(repr(exc))
    elapsed = time.monotonic() - start
    replies, errors, last_error = 0, 0, 0.0
    kept: list[dict[str, str]] = []
    deadline = time.monotonic() + a.wait
    while replies + errors < sent and (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([raw, udp], [], [], left)
        if raw in ready:
            data, (src, _) = raw.recvfrom(4096)
            if quotes(data, sport, a.dst, a.port):
                errors += 1
                last_error = time.monotonic() - start
                if len(kept) < KEEP:
                    kept.append({"src": src, "hex": data.hex()})
        if udp in ready:
            try:
                udp.recv(4096)
                replies += 1
            except OSError as exc:
                send_errors.append(repr(exc))
    route = subprocess.run(["ip", "route", "get", a.dst], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"sent": sent, "elapsed": elapsed, "last_error": last_error, "sport": sport, "replies": replies,
                      "errors": errors, "kept": kept, "send_errors": send_errors[:5], "route": route}))


if __name__ == "__main__":
    main()
