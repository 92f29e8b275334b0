"""``python -m tests.ebpf.nstool load|attach OBJ PIN_DIR [PROG=IF,IF ...]``, run inside a lab namespace.

``python -m tests.ebpf.nstool catch IFNAME SRC_IP PROTO SECONDS``: print READY, then the hex of the
first IPv4 frame from SRC_IP with IP protocol PROTO seen on IFNAME (or nothing after SECONDS): the
datapath tests check the bytes of the answers the program builds (RST, port unreachable).

The loader attaches in the namespace it runs in, so the datapath tests run this in the host
namespace (``ip netns exec``): ``load`` creates and pins the maps, ``attach`` loads the object
again (reusing the pinned maps, as a restarted agent does) and attaches each program to the
listed interfaces. tc holds the programs after this process exits.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

from portmesh.agent.ebpf import loader


def catch(ifname: str, src: str, proto: int, seconds: float) -> None:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    s.bind((ifname, 0))
    s.settimeout(0.1)
    print("READY", flush=True)
    want = socket.inet_aton(src)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            frame = s.recv(4096)
        except TimeoutError:
            continue
        if len(frame) >= 34 and frame[23] == proto and frame[26:30] == want:
            print(frame.hex(), flush=True)
            return


def main(argv: list[str]) -> None:
    if argv[0] == "catch":
        catch(argv[1], argv[2], int(argv[3]), float(argv[4]))
        return
    mode, obj, pin = argv[0], Path(argv[1]), Path(argv[2])
    with loader.load(obj, pin) as loaded:
        if mode == "attach":
            for spec in argv[3:]:
                prog, ifnames = spec.split("=", 1)
                for ifname in ifnames.split(","):
                    loader.attach(socket.if_nametoindex(ifname), loaded.program_fd(prog), prog)


if __name__ == "__main__":
    main(sys.argv[1:])
