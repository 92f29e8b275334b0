"""The eBPF datapath's paths of bench/dataplane, and the targets the default run is judged by.

``portmesh_ebpf`` is ``portmesh`` (bench/dataplane_portmesh.py) on a lab brought up with
``lab up --datapath ebpf``: the same containers, the same client (the lab's ``inet``), the
same three figures; only what forwards on the host differs (tc programs and maps, no
ovs-vswitchd). Its lab is named ``<lab-name>e`` so it never meets the OVS path's.

``mh_ebpf_*`` are the four mh_* paths (bench/dataplane_multihost.py) on a 3-host lab whose
hosts all run eBPF, lab ``<lab-name>me``. They are separate names rather than a
``--datapath`` switch on the multihost group so that one run can hold both datapaths side by
side in one JSON (``--paths multihost,multihost_ebpf``: each group still builds, measures
and tears down its own lab before the next). No per-GB switch CPU on eBPF: the programs run
in softirq, charged to whichever process they interrupt, so there is no switch process to read.

``lb_ebpf_single`` / ``lb_ebpf_three`` are the lb_* paths (bench/dataplane_balancing.py) on
a one-host eBPF lab (``--paths balancing_ebpf``; ``balancing_ebpf`` in the JSON), lab
``<lab-name>be``: the eBPF datapath balances since issue 15's eBPF half landed.

``targets`` (issue 14): the product against the two baselines of the same run, medians:
eBPF >= 1.0x bridge_dnat and >= 0.9x direct, OVS >= 0.85x bridge_dnat, for throughput and
new connections per second (higher is better) and RTT p50 (given as base/path, so higher
is better there too).

Measured 2026-11-30 on the 2-CPU dev box (medians of 3 rounds; compare ratios of one run):
default paths at load 0.7: eBPF 19.4 Gbit/s, rtt p50 0.075 ms, 7172 conn/s = x1.23 / x1.25
bridge_dnat and x1.01 / x0.91 direct (all three targets met); OVS 12.8 Gbit/s = x0.81
bridge_dnat (not met). Cross-host on eBPF: c2c x0.66, inet x0.77 (OVS, same run: x0.62, x0.58).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from dataplane_balancing import BalancingLab
from dataplane_common import Target
from dataplane_multihost import MultiHostLab
from dataplane_portmesh import PortmeshPath

if TYPE_CHECKING:
    from dataplane_bench import Bench

EBPF = ["--datapath", "ebpf"]
# (path, base, minimum ratio)
TARGETS = (
    ("portmesh_ebpf", "bridge_dnat", 1.0),
    ("portmesh_ebpf", "direct", 0.9),
    ("portmesh", "bridge_dnat", 0.85),
)
# figure -> True when higher is better
FIGURES = {"gbps": True, "conn_per_s": True, "rtt_ms_p50": False}


class EbpfPath(PortmeshPath):
    """``portmesh`` on a one-host eBPF lab."""

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.lab = f"{bench.args.lab_name}e"

    def datapath_flags(self) -> list[str]:
        return EBPF


class EbpfMultiHostLab(MultiHostLab):
    """The 3-host lab of the mh_* paths with every host on eBPF."""

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.lab = f"{bench.args.lab_name}me"

    def datapath_flags(self) -> list[str]:
        return EBPF

    def target(self, path: str) -> Target:
        # No ovs-vswitchd to read CPU from: leave the per-GB figure out rather than report 0.
        return dataclasses.replace(super().target(path), cpu_seconds=None)


class EbpfBalancingLab(BalancingLab):
    """The lb_* lab (3 backends behind one mapping, and a plain one) on an eBPF host: lb_ebpf_*."""

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
        self.lab = f"{bench.args.lab_name}be"

    def datapath_flags(self) -> list[str]:
        return EBPF

    def target(self, path: str) -> Target:
        # Upcalls and switch CPU are ovs-vswitchd's; an eBPF host has neither.
        return dataclasses.replace(super().target(path), switch_work=None)


def targets(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each target whose two paths were measured in this run: the ratio per figure and whether it is met."""
    out: dict[str, Any] = {}
    for path, base, minimum in TARGETS:
        p, b = results.get(path, {}), results.get(base, {})
        if "status" in p or "status" in b or not p or not b:
            continue
        row: dict[str, Any] = {"minimum": minimum}
        for key, higher in FIGURES.items():
            pv, bv = p.get(key), b.get(key)
            if isinstance(pv, int | float) and isinstance(bv, int | float) and pv and bv:
                ratio = round(pv / bv if higher else bv / pv, 3)
                row[key] = {"ratio": ratio, "met": ratio >= minimum}
        out[f"{path}/{base}"] = row
    return out


def print_targets(goals: dict[str, Any]) -> None:
    if goals:
        print("targets (ratio of medians; rtt as base/path, so higher is better for every figure)")
    for pair, row in goals.items():
        cells = [
            f"{k} x{v['ratio']:.3f} {'met' if v['met'] else 'NOT met'}" for k, v in row.items() if isinstance(v, dict)
        ]
        print(f"  {pair:<28} >= {row['minimum']}: " + "  ".join(cells))
