"""Path (d) of bench/dataplane: the real product, driven only through its front doors.

``python -m portmesh.lab up --name <lab>`` builds the lab, ``portmesh run`` starts two
containers that share one public IP — the benchmark's HTTP server on :80 and
``iperf3 -s`` on :5201, the point of portmesh — and traffic goes from the lab's
``inet`` namespace straight to that public IP: no DNAT, no proxy. The lab is torn
down with ``lab down`` (which removes exactly what it recorded) only if this run
brought it up. Anything missing or failing makes the path "unavailable" with the
reason, never a crash of the whole benchmark.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dataplane_common import HTTP_PORT, IPERF_PORT, PUBLIC_IP, REPO, TOOLS, BenchError, Target, log, python_exe

if TYPE_CHECKING:
    from dataplane_bench import Bench

LAB_ROOT = Path("/run/portmesh")
WEB = "pmb-web"
IPERF = "pmb-iperf"


def portmesh_cli() -> str:
    """The ``portmesh`` console script of the project venv (``python -m portmesh.cli`` is not assumed)."""
    exe = REPO / ".venv" / "bin" / "portmesh"
    if not exe.exists():
        raise BenchError(f"{exe} not found (the CLI is not installed in the venv)")
    return str(exe)


class PortmeshPath:
    """Brings the lab up, runs the servers as portmesh containers, measures, tears down."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.lab = bench.args.lab_name
        self.env = dict(os.environ)
        self.lab_state: dict[str, Any] = {}

    def _py(self, argv: list[str], timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.bench.run([python_exe(), *argv], timeout=timeout, check=check, env=self.env)

    def _cli(self, argv: list[str], timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.bench.run([portmesh_cli(), *argv], timeout=timeout, check=check, env=self.env)

    def preflight(self) -> None:
        probe = self._py(
            ["-c", "import importlib.util as u; print(bool(u.find_spec('portmesh.lab.__main__')))"], timeout=30, check=False
        )
        if probe.stdout.strip() != "True":
            raise BenchError("portmesh.lab has no __main__ yet (python -m portmesh.lab up is not available)")
        helps = self._cli(["run", "--help"], timeout=30, check=False)
        if helps.returncode != 0:
            raise BenchError(f"`portmesh run --help` failed: {(helps.stderr or helps.stdout).strip()[-300:]}")
        self.run_help = helps.stdout
        self.up_help = self._py(["-m", "portmesh.lab", "up", "--help"], timeout=30, check=False).stdout
        if (LAB_ROOT / self.lab / "lab.json").exists():
            raise BenchError(f"a lab named {self.lab!r} already exists ({LAB_ROOT / self.lab}); not touching it (use --lab-name)")

    def lab_up(self) -> None:
        # Registered before `up`: a lab that fails half-way is still torn down (it records as it goes).
        self.bench.cleanup_hooks.append(self.lab_down)
        t0 = time.monotonic()
        p = self._py(
            ["-m", "portmesh.lab", "up", "--name", self.lab, *self.rmem_flag(), *self.datapath_flags()],
            timeout=self.bench.args.lab_timeout, check=False
        )
        if p.returncode != 0:
            raise BenchError(f"lab up failed (rc {p.returncode}): {(p.stderr or p.stdout).strip()[-400:]}")
        log(f"portmesh: lab {self.lab!r} up in {time.monotonic() - t0:.1f}s")
        try:
            self.lab_state = json.loads((LAB_ROOT / self.lab / "lab.json").read_text())
        except (OSError, ValueError) as e:
            raise BenchError(f"lab up succeeded but its state is unreadable: {e}") from None
        api = self.lab_state.get("api_url")
        if api:
            self.env["PORTMESH_API"] = str(api)
        token = LAB_ROOT / self.lab / "api.token"
        if token.exists():
            self.env["PORTMESH_TOKEN_FILE"] = str(token)

    def rmem_flag(self) -> list[str]:
        """The bench owns net.core.rmem_default (it reports the value); the lab must leave it alone."""
        return ["--no-tune-rmem"] if "--no-tune-rmem" in self.up_help else []

    def datapath_flags(self) -> list[str]:
        """``lab up`` flags choosing what forwards on the hosts: the default (OVS) here; eBPF in dataplane_ebpf.py."""
        return []

    def lab_down(self) -> None:
        p = self._py(["-m", "portmesh.lab", "down", "--name", self.lab], timeout=60, check=False)
        if p.returncode != 0:
            log(f"portmesh: lab down rc {p.returncode}: {(p.stderr or p.stdout).strip()[-300:]}")
        else:
            log(f"portmesh: lab {self.lab!r} down")

    @property
    def prefix(self) -> str:
        return str(self.lab_state.get("prefix") or f"pm-{self.lab}-")

    def container_ns(self, name: str) -> str:
        return f"{self.prefix}c-{name}"

    def run_container(self, name: str, port: int, command: list[str]) -> None:
        hosts = self.lab_state.get("hosts") or ["h1"]
        argv = ["run", name, "--host", str(hosts[0]), "--ip", PUBLIC_IP, "--port", f"{port}/tcp", "--wait"]
        self._cli([*argv, "--", *command], timeout=self.bench.args.lab_timeout)

    def wait_listening(self, name: str, port: int) -> None:
        ns = self.container_ns(name)
        deadline = time.monotonic() + self.bench.args.lab_timeout
        last = ""
        while time.monotonic() < deadline:
            p = self.bench.run(["ss", "-Hltn", f"sport = :{port}"], ns=ns, check=False)
            if p.returncode == 0 and p.stdout.strip():
                return
            last = p.stderr.strip()
            time.sleep(0.2)
        raise BenchError(f"container {name} ({ns}) not listening on :{port}: {last}")

    def setup(self) -> Target:
        self.preflight()
        self.lab_up()
        self.run_container(WEB, HTTP_PORT, [python_exe(), str(TOOLS), "server", "--port", str(HTTP_PORT)])
        self.run_container(IPERF, IPERF_PORT, ["iperf3", "-s", "-p", str(IPERF_PORT)])
        self.wait_listening(WEB, HTTP_PORT)
        self.wait_listening(IPERF, IPERF_PORT)
        inet = self.prefix + "inet"
        # Same client tuning as the other paths' client namespaces (the lab is ours and goes away after).
        for key, value in (("net.ipv4.ip_local_port_range", "1024 65000"), ("net.ipv4.tcp_tw_reuse", "1")):
            with contextlib.suppress(BenchError):
                self.bench.sysctl(inet, key, value)
        mtu = self.bench.run(["cat", "/sys/class/net/eth0/mtu"], ns=self.container_ns(WEB), check=False).stdout.strip()
        if mtu and int(mtu) != 1500:
            self.bench.notes.append(f"portmesh containers run with MTU {int(mtu)} (VXLAN headroom); the others with 1500")
        cpu0, t0 = self.control_cpu_seconds(), time.monotonic()

        def extra() -> dict[str, Any]:
            # CPU the lab's control plane (store, controller, agent, API; not ovs-vswitchd, which
            # forwards) used while we measured: one that spins steals the data plane's cycles.
            cores = (self.control_cpu_seconds() - cpu0) / max(time.monotonic() - t0, 1e-6)
            return {"container_mtu": int(mtu) if mtu else None, "control_plane_cpu_cores": round(cores, 2)}

        return Target(inet, PUBLIC_IP, HTTP_PORT, IPERF_PORT, extra=extra)

    def control_cpu_seconds(self) -> float:
        """utime+stime of the lab's recorded processes but ovs-vswitchd, from /proc (0 for any gone)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for proc in self.lab_state.get("processes") or []:
            if str(proc.get("label", "")).startswith("ovs-vswitchd"):
                continue
            with contextlib.suppress(OSError, ValueError, IndexError, KeyError):
                fields = Path(f"/proc/{int(proc['pid'])}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
        return total


class PortmeshOpenPath(PortmeshPath):
    """The product without its host isolation: what a container's traffic cost before issue 11.

    Set up like :class:`PortmeshPath` (in a lab of its own, ``<lab-name>o``), then the agent is
    stopped (by its recorded PID; it would put the rules back on its next full pass) and both
    nftables tables ``portmesh`` are deleted in the host namespace. The pipeline is unchanged.

    Without isolation the host kernel answers a container's ARP for the gateway with the veth's
    MAC, and its answer wins (the switch's comes through userspace OVS, later): the container's
    traffic then goes through the host kernel instead of OVS -- faster, and past every flow. That
    is the bug, not a figure to compare with. So each container's gateway neighbour is pinned to
    the gateway MAC (``nud permanent``): the traffic still crosses the switch, and the only
    difference left is the nftables rules (the host kernel gets, and drops, a copy of each frame).
    """

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.lab = f"{bench.args.lab_name}o"

    def setup(self) -> Target:
        target = super().setup()
        hosts = self.lab_state.get("hosts") or ["h1"]
        for proc in self.lab_state.get("processes") or []:
            if str(proc.get("label", "")) == f"agent:{hosts[0]}":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(proc["pid"]), signal.SIGTERM)
                deadline = time.monotonic() + 10
                while Path(f"/proc/{int(proc['pid'])}").exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
        host_ns = f"{self.prefix}{hosts[0]}"
        for family in ("inet", "netdev"):
            self.bench.run(["nft", "delete", "table", family, "portmesh"], ns=host_ns, check=False)
        # Table netdev portmesh_uplink stays: it is not isolation but the uplink's (the kernel must not route
        # pool traffic the switch already took, docs/deploy.md).
        left = self.bench.run(["nft", "list", "tables"], ns=host_ns, check=False).stdout
        if {"table inet portmesh", "table netdev portmesh"} & set(left.splitlines()):
            raise BenchError(f"could not remove the isolation tables in {host_ns}: {left.strip()}")
        from portmesh.model.config import DEFAULT_CONFIG

        gw = DEFAULT_CONFIG
        for name in (WEB, IPERF):
            self.bench.run(["ip", "neigh", "replace", str(gw.gateway_ip), "lladdr", gw.gateway_mac, "dev", "eth0",
                            "nud", "permanent"], ns=self.container_ns(name))
        self.bench.notes.append(
            "portmesh_open: the product with its nftables isolation removed (agent stopped), "
            "containers' gateway neighbour pinned to the switch's MAC so traffic still crosses OVS"
        )
        return target
