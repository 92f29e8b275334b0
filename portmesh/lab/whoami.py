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
from typing import cast


def line(name: str, client: tuple[str, int], local: tuple[str, int]) -> bytes:
    return f"name={name} client={client[0]}:{client[1]} local={local[0]}:{local[1]}\n".encode()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport is not an asyncio.DatagramTransport subclass at runtime.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        assert self.transport is not None
        local = self.transport.get_extra_info("sockname")
        self.transport.sendto(line(self.name, (str(addr[0]), int(addr[1])), local[:2]), addr)


async def serve(name: str, tcp: list[int], udp: list[int], host: str = "0.0.0.0") -> None:
    async def on_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(line(name, writer.get_extra_info("peername")[:2], writer.get_extra_info("sockname")[:2]))
            await writer.drain()
        writer.close()

    servers = [await asyncio.start_server(on_tcp, host, port, reuse_address=True, backlog=4096) for port in tcp]
    loop = asyncio.get_running_loop()
    transports = [(await loop.create_datagram_endpoint(lambda: _Udp(name), local_addr=(host, port)))[0] for port in udp]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"whoami {name}: tcp {tcp} udp {udp}", flush=True)
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
    ap.add_argument("--bind", default="0.0.0.0", help="address to listen on")
    args = ap.parse_args(argv)
    if not args.tcp and not args.udp:
        ap.error("give at least one --tcp or --udp port")
    asyncio.run(serve(args.name, args.tcp, args.udp, args.bind))


if __name__ == "__main__":
    main()
