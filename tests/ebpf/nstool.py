"""``python -m tests.ebpf.nstool load|attach OBJ PIN_DIR [PROG=IF,IF ...]``, run inside a lab namespace.

The loader attaches in the namespace it runs in, so the datapath tests run this in the host
namespace (``ip netns exec``): ``load`` creates and pins the maps, ``attach`` loads the object
again (reusing the pinned maps, as a restarted agent does) and attaches each program to the
listed interfaces. tc holds the programs after this process exits.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from portmesh.agent.ebpf import loader


def main(argv: list[str]) -> None:
    mode, obj, pin = argv[0], Path(argv[1]), Path(argv[2])
    with loader.load(obj, pin) as loaded:
        if mode == "attach":
            for spec in argv[3:]:
                prog, ifnames = spec.split("=", 1)
                for ifname in ifnames.split(","):
                    loader.attach(socket.if_nametoindex(ifname), loaded.program_fd(prog), prog)


if __name__ == "__main__":
    main(sys.argv[1:])
