"""Load-balanced paths of bench/dataplane (issue 15): new connections/s through a mapping of 3
backends next to the single-backend figure, same lab, same run, rounds interleaved.

``python -m portmesh.lab up`` (one host), then through the CLI only: three containers
``pmb-lb-1..3`` holding 203.0.113.30, each running the benchmark's HTTP server on :80, behind
one mapping ``portmesh map add 203.0.113.30 80/tcp pmb-lb-1 pmb-lb-2 pmb-lb-3``; each of the three
also holds an address of its own (203.0.113.32..34) with a plain mapping of :80; and one container
``pmb-lb-0`` holding 203.0.113.31 with a plain mapping of :80 (``run -p 80/tcp``), compiled exactly
as before issue 15. Three paths, measured from inet:

  lb_single  inet -> 203.0.113.31:80, one backend (the baseline);
  lb_three   inet -> 203.0.113.30:80, three backends: per new connection the switch picks a
             backend by weight and remembers the choice;
  lb_spread  inet -> 203.0.113.32..34:80 in turn, plain mappings: the same three server processes
             sharing the same load, with no balancing in the switch (the control).

lb_three / lb_single is the issue's figure. It also holds a cost that is not the switch's: three
server processes sharing the connections on a 2-core machine (each wakes for fewer connections, so
more wake-ups in all). lb_three / lb_spread separates the two: the price of the balancing itself.

Every backend on the one host: the only difference between the paths is the balancing, not a
tunnel. Connection rate and RTT only: iperf3's control and data connections are two
connections and may land on two backends (each backend would need its own iperf3 session).
``balancing`` in the JSON holds the ratios (target for lb_three / lb_single >= 0.9: within 10 %).
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dataplane_common import HTTP_PORT, TOOLS, BenchError, Target, python_exe
from dataplane_portmesh import LAB_ROOT, PortmeshPath

if TYPE_CHECKING:
    from dataplane_bench import Bench

VIP, SINGLE_IP = "203.0.113.30", "203.0.113.31"
OWN_IPS = ("203.0.113.32", "203.0.113.33", "203.0.113.34")  # one per backend, plain mappings: lb_spread
BACKENDS = ("pmb-lb-1", "pmb-lb-2", "pmb-lb-3")
SINGLE = "pmb-lb-0"
TARGET_RATIO = 0.9


class BalancingLab(PortmeshPath):
    """The one-host lab with the three backends and the single one, built once for both paths."""

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.lab = f"{bench.args.lab_name}b"
        self.built = False

    def start(self, name: str, ips: list[str], ports: list[str]) -> None:
        server = [python_exe(), str(TOOLS), "server", "--port", str(HTTP_PORT)]
        argv = ["run", name, "--host", "h1", *(a for ip in ips for a in ("--ip", ip)),
                *(a for p in ports for a in ("--port", p)), "--wait"]  # fmt: skip
        self._cli([*argv, "--", *server], timeout=self.bench.args.lab_timeout)

    def build(self) -> None:
        self.preflight()
        helps = self._cli(["map", "add", "--help"], timeout=30, check=False)
        if helps.returncode != 0 or "--weight" not in helps.stdout:
            raise BenchError("`portmesh map add` takes no several backends yet (no --weight in its help)")
        self.lab_up()
        for name, own in zip(BACKENDS, OWN_IPS, strict=True):
            self.start(name, [VIP, own], [])
            # a mapping of one of its IPs only (`run -p` maps a port on every IP the container holds)
            self._cli(["map", "add", own, f"{HTTP_PORT}/tcp", name, "--wait"], timeout=self.bench.args.lab_timeout)
        self.start(SINGLE, [SINGLE_IP], [f"{HTTP_PORT}/tcp"])
        self._cli(["map", "add", VIP, f"{HTTP_PORT}/tcp", *BACKENDS, "--wait"], timeout=self.bench.args.lab_timeout)
        for name in (*BACKENDS, SINGLE):
            self.wait_listening(name, HTTP_PORT)
        inet = self.prefix + "inet"
        for key, value in (("net.ipv4.ip_local_port_range", "1024 65000"), ("net.ipv4.tcp_tw_reuse", "1")):
            with contextlib.suppress(BenchError):
                self.bench.sysctl(inet, key, value)
        self.built = True

    def target(self, path: str) -> Target:
        if not self.built:
            self.build()
        inet = self.prefix + "inet"
        cpu0, t0 = self.control_cpu_seconds(), time.monotonic()

        def extra() -> dict[str, Any]:
            cores = (self.control_cpu_seconds() - cpu0) / max(time.monotonic() - t0, 1e-6)
            return {"backends": 1 if path.endswith("_single") else 3, "control_plane_cpu_cores": round(cores, 2)}

        host = {"three": VIP, "spread": ",".join(OWN_IPS)}.get(path.rsplit("_", 1)[1], SINGLE_IP)
        return Target(inet, host, HTTP_PORT, 0, extra=extra, iperf=False, switch_work=self.switch_work)

    def switch_work(self) -> dict[str, float]:
        """h1's ovs-vswitchd so far: datapath lookups that missed (each one an upcall to its
        handler threads: a new megaflow, a ``learn`` executed) and its CPU seconds (all threads,
        from /proc); ``*_per_conn`` in the figures (CPU in microseconds)."""
        out: dict[str, float] = {}
        ctl = LAB_ROOT / self.lab / "h1" / "ovs-vswitchd.ctl"
        shown = self.bench.run(["ovs-appctl", "-t", str(ctl), "dpctl/show"], ns=self.prefix + "h1", check=False).stdout
        if m := re.search(r"lookups: hit:(\d+) missed:(\d+)", shown):
            out["upcalls"] = float(m.group(2))
        tick = os.sysconf("SC_CLK_TCK")
        for proc in self.lab_state.get("processes") or []:
            if str(proc.get("label", "")) == "ovs-vswitchd:h1":
                with contextlib.suppress(OSError, ValueError, IndexError, KeyError):
                    fields = Path(f"/proc/{int(proc['pid'])}/stat").read_text().rsplit(")", 1)[1].split()
                    out["switch_cpu_s"] = (int(fields[11]) + int(fields[12])) / tick
        return out


def shared(bench: Bench, ebpf: bool = False) -> BalancingLab:
    """The run's one balancing lab per datapath (lb_ebpf_*: dataplane_ebpf.EbpfBalancingLab)."""
    attr = "balancing_ebpf" if ebpf else "balancing"
    lab: BalancingLab | None = getattr(bench, attr, None)
    if lab is None:
        if ebpf:
            from dataplane_ebpf import EbpfBalancingLab

            lab = EbpfBalancingLab(bench)
        else:
            lab = BalancingLab(bench)
        setattr(bench, attr, lab)
        bench.cleanup_hooks.append(lambda: setattr(bench, attr, None))
    return lab


def per_round_ratios(num: dict[str, Any], den: dict[str, Any]) -> list[float]:
    """num / den round by round: the paths alternate, so each pair ran under about the same load."""
    nums = num.get("per_round", {}).get("conn_per_s") or []
    dens = den.get("per_round", {}).get("conn_per_s") or []
    return [round(n / d, 3) for d, n in zip(dens, nums, strict=False) if d]


def balancing(results: dict[str, dict[str, Any]], prefix: str = "lb_") -> dict[str, Any]:
    """lb_three / lb_single, and lb_spread beside them (``prefix`` "lb_ebpf_": the same on eBPF)."""
    one, three = results.get(f"{prefix}single", {}), results.get(f"{prefix}three", {})
    spread = results.get(f"{prefix}spread", {})
    if not one.get("conn_per_s") or "conn_per_s" not in three:
        return {}
    ratio = three["conn_per_s"] / one["conn_per_s"]
    per_round = per_round_ratios(three, one)
    control: dict[str, Any] = {}
    if spread.get("conn_per_s"):
        cost = per_round_ratios(three, spread)
        control = {
            "conn_per_s_spread": spread["conn_per_s"],
            # the price of the balancing itself: the same three servers, with and without it
            "conn_ratio_three_vs_spread": round(three["conn_per_s"] / spread["conn_per_s"], 3),
            "conn_ratio_three_vs_spread_per_round": cost,
            # what three server processes cost on this machine without any balancing
            "conn_ratio_spread_vs_single": round(spread["conn_per_s"] / one["conn_per_s"], 3),
            "conn_ratio_spread_vs_single_per_round": per_round_ratios(spread, one),
        }
    return {
        "conn_per_s_single": one["conn_per_s"],
        "conn_per_s_three": three["conn_per_s"],
        "conn_ratio": round(ratio, 3),
        "conn_ratio_per_round": per_round,
        "conn_ratio_median_of_rounds": statistics.median(per_round) if per_round else None,
        "per_round_single": one.get("per_round", {}).get("conn_per_s"),
        "per_round_three": three.get("per_round", {}).get("conn_per_s"),
        "rtt_ms_p50_single": one.get("rtt_ms_p50"),
        "rtt_ms_p50_three": three.get("rtt_ms_p50"),
        "upcalls_per_conn_single": one.get("upcalls_per_conn"),
        "upcalls_per_conn_three": three.get("upcalls_per_conn"),
        "switch_cpu_us_per_conn_single": one.get("switch_cpu_s_per_conn"),
        "switch_cpu_us_per_conn_three": three.get("switch_cpu_s_per_conn"),
        **control,
        "target": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
    }


def print_balancing(summary: dict[str, Any], label: str = "balancing") -> None:
    if summary:
        print(
            f"{label}: {summary['conn_per_s_three']:.0f} conn/s through 3 backends vs {summary['conn_per_s_single']:.0f} "
            f"through one = x{summary['conn_ratio']:.3f}, rounds {summary['conn_ratio_per_round']} "
            f"(target >= {summary['target']}: "
            f"{'met' if summary['meets_target'] else 'NOT met'}); rtt p50 {summary['rtt_ms_p50_three']} vs "
            f"{summary['rtt_ms_p50_single']} ms"
            + (
                f"; control: {summary['conn_per_s_spread']:.0f} conn/s to the same 3 servers by plain mappings: "
                f"3 backends vs that x{summary['conn_ratio_three_vs_spread']:.3f} (the balancing itself, rounds "
                f"{summary['conn_ratio_three_vs_spread_per_round']}), "
                f"3 servers vs 1 x{summary['conn_ratio_spread_vs_single']:.3f}"
                if "conn_per_s_spread" in summary
                else ""
            )
            + (
                f"; per connection h1's switch: "
                f"{summary['upcalls_per_conn_three']} vs {summary['upcalls_per_conn_single']} upcalls, "
                f"{summary['switch_cpu_us_per_conn_three']} vs {summary['switch_cpu_us_per_conn_single']} us CPU"
                if summary.get("upcalls_per_conn_three") is not None  # none on eBPF: no ovs-vswitchd
                else ""
            )
        )
