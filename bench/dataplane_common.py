"""What every module of bench/dataplane shares: the run's addresses and ports, the path names, the
:class:`Target` a built path hands to the measurements, the error that makes a path "unavailable".

Kept apart from dataplane_bench.py (the CLI and the :class:`~dataplane_bench.Bench` that owns a run's
resources) so the path modules and the measurements can import it without importing the CLI.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOOLS = HERE / "dataplane_tools.py"
MH_PATHS = ("mh_c2c_same", "mh_c2c_cross", "mh_inet_gw", "mh_inet_compute")  # bench/dataplane_multihost.py
MH_EBPF_PATHS = tuple(p.replace("mh_", "mh_ebpf_", 1) for p in MH_PATHS)  # the same on eBPF hosts (dataplane_ebpf.py)
LB_PATHS = ("lb_single", "lb_spread", "lb_three")  # bench/dataplane_balancing.py
LB_EBPF_PATHS = ("lb_ebpf_single", "lb_ebpf_spread", "lb_ebpf_three")  # the same on eBPF (dataplane_ebpf.py)
GROUPED = (MH_PATHS, MH_EBPF_PATHS, LB_PATHS, LB_EBPF_PATHS)  # share one lab, compared with each other: one group
PATHS = ("direct", "bridge_dnat", "ovs_ctnat", "portmesh", "portmesh_ebpf", "portmesh_open", *sum(GROUPED, ()))
DEFAULT_PATHS = PATHS[:5]

CLIENT_IP = "198.51.100.2"
OUTSIDE_GW = "198.51.100.1"
PUBLIC_IP = "203.0.113.10"
PRIVATE_GW = "198.18.0.1"
PRIVATE_IP = "198.18.0.2"
HTTP_PORT = 80
IPERF_PORT = 5201
PUBLISHED_HTTP = 8080  # docker run -p 8080:80
GW_MAC = "0a:50:4d:42:00:01"
CLI_MAC = "0a:50:4d:42:00:02"
SRV_MAC = "0a:50:4d:42:00:03"


@dataclass
class Target:
    """Where a path is measured from and to, once it is built; ``extra`` adds path-specific facts at the end."""

    client_ns: str
    host: str
    http_port: int
    iperf_port: int
    extra: Callable[[], dict[str, Any]] = field(default=lambda: {})
    cps: bool = True  # measure new connections/s (a container client's few source ports cannot)
    tunnel_bytes: Callable[[], int] | None = None  # bytes through the hosts' tunnels so far (multihost)
    cpu_seconds: Callable[[], dict[str, float]] | None = None  # CPU used so far by each host's switch (multihost)
    iperf: bool = True  # measure throughput (a load-balanced mapping cannot: iperf3's two connections may split)
    switch_work: Callable[[], dict[str, float]] | None = None  # the switch's datapath misses and CPU seconds so far


class BenchError(RuntimeError):
    """A path could not be set up or measured; the message says why."""


def log(msg: str) -> None:
    """Progress on stderr: stdout carries only the table and the final JSON line."""
    print(f"[dataplane] {msg}", file=sys.stderr, flush=True)


def python_exe() -> str:
    """The project venv's interpreter (it has portmesh); the current one otherwise."""
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable

