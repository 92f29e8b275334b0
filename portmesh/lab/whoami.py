"""``python -m portmesh.lab.whoami --name N [--tcp PORT]... [--udp PORT]...``: who am I, who are you.

Answers each TCP connection and each UDP datagram with one line
``name=N client=IP:PORT local=IP:PORT``: the addresses as this endpoint sees
them, which is how the demo and the tests prove there is no NAT (the client's
real address and the public destination address arrive untouched).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import struct


def line(name: str, client: tuple[str, int], local: tuple[str, int]) -> bytes:
    return f"name={name} client={client[0]}:{client[1]} local={local[0]}:{local[1]}\n".encode()


IN_PKTINFO = struct.Struct("=i4s4s")  # ifindex, spec_dst, addr (the packet's destination)
IP_PKTINFO = 8  # <linux/in.h>; typeshed does not declare IP_PKTINFO


def udp_server(name: str, host: str, port: int) -> socket.socket:
    """A UDP socket that answers each datagram from the address it was sent to.

    IP_PKTINFO tells which of the container's IPs the datagram was addressed to,
    so the answer reports it (and leaves from it) even on a wildcard socket.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    sock.bind((host, port))
    sock.setblocking(False)

    def on_readable() -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            _data, ancdata, _flags, client = sock.recvmsg(2048, socket.CMSG_SPACE(IN_PKTINFO.size))
            local = host
            for level, kind, blob in ancdata:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                    local = socket.inet_ntoa(IN_PKTINFO.unpack(blob[: IN_PKTINFO.size])[2])
            reply_info = IN_PKTINFO.pack(0, socket.inet_aton(local), b"\0" * 4)
            sock.sendmsg([line(name, client, (local, port))], [(socket.IPPROTO_IP, IP_PKTINFO, reply_info)], 0, client)

    asyncio.get_running_loop().add_reader(sock.fileno(), on_readable)
    return sock


async def serve(name: str, tcp: list[int], udp: list[int], host: str = "0.0.0.0", http: list[int] | None = None) -> None:
    async def on_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(line(name, writer.get_extra_info("peername")[:2], writer.get_extra_info("sockname")[:2]))
            await writer.drain()
        writer.close()

    async def on_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Minimal HTTP/1.0: read the request head, answer the same line as TCP (curl-friendly).
        with contextlib.suppress(ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            body = line(name, writer.get_extra_info("peername")[:2], writer.get_extra_info("sockname")[:2])
            head = f"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        writer.close()

    servers = [await asyncio.start_server(on_tcp, host, port, reuse_address=True, backlog=4096) for port in tcp]
    servers += [await asyncio.start_server(on_http, host, port, reuse_address=True, backlog=4096) for port in http or []]
    loop = asyncio.get_running_loop()
    transports = [udp_server(name, host, port) for port in udp]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"whoami {name}: tcp {tcp} http {http or []} udp {udp}", flush=True)
    await stop.wait()
    for server in servers:
        server.close()
    for transport in transports:
        transport.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m portmesh.lab.whoami", description=__doc__)
    ap.add_argument("--name", required=True)
    ap.add_argument("--tcp", type=int, action="append", default=[])
    ap.add_argument("--udp", type=int, action="append", default=[])
    ap.add_argument("--http", type=int, action="append", default=[], help="answer HTTP requests on this TCP port")
    ap.add_argument("--bind", default="0.0.0.0", help="address to listen on")
    args = ap.parse_args(argv)
    if not args.tcp and not args.udp and not args.http:
        ap.error("give at least one --tcp, --udp or --http port")
    asyncio.run(serve(args.name, args.tcp, args.udp, args.bind, args.http))


if __name__ == "__main__":
    main()
