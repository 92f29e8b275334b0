"""The measurements and figures of bench/dataplane: one round over a built path (latency, new
connections/s, throughput, and what the switch spent), the medians over rounds, the ratios
between paths and the table printed at the end.

The client side runs in the path's client namespace: iperf3 and the ``rr``/``cps`` tools of
bench/dataplane_tools.py, whose last output line is JSON.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from typing import TYPE_CHECKING, Any

from dataplane_common import GROUPED, PATHS, TOOLS, BenchError, Target, log, python_exe

if TYPE_CHECKING:
    from dataplane_bench import Bench


def measure(bench: Bench, path: str, t: Target) -> dict[str, Any]:
    """One round of the three figures over one path."""
    ns, host, http_port, iperf_port = t.client_ns, t.host, t.http_port, t.iperf_port
    a = bench.args
    out: dict[str, Any] = {}
    tunnel0 = t.tunnel_bytes() if t.tunnel_bytes else 0
    # Latency first, on an idle path.
    rr = _tool_json(
        bench,
        ns,
        ["rr", "--host", host, "--port", str(http_port), "--count", str(a.rr_count), "--seconds", str(a.rr_seconds)],
        timeout=a.rr_seconds + 10,
    )
    out["rtt_ms_p50"] = rr["rtt_ms_p50"]
    out["rtt_ms_p99"] = rr["rtt_ms_p99"]
    out["rtt_samples"] = rr["samples"]
    work0 = t.switch_work() if t.switch_work and t.cps else {}
    cps = _cps(bench, ns, host, http_port) if t.cps else None
    if cps is not None:
        out["conn_per_s"] = cps["conn_per_s"]
        out["conn_failed"] = cps["failed"]
    if cps is not None and t.switch_work and cps.get("connections"):
        # What each new connection cost the switch: upcalls (datapath misses) and CPU.
        work1, conns = t.switch_work(), int(cps["connections"])
        for key, value in work1.items():
            per = (value - work0.get(key, value)) / conns
            out[f"{key}_per_conn"] = round(per * 1e6, 1) if key.endswith("cpu_s") else round(per, 2)
    cpu0 = t.cpu_seconds() if t.cpu_seconds else {}
    if not t.iperf:
        log(f"  {path}: rtt p50 {out['rtt_ms_p50']:.3f} ms p99 {out['rtt_ms_p99']:.3f} ms"
            + (f", {out['conn_per_s']:.0f} conn/s ({out['conn_failed']} failed)" if cps is not None else ""))
        return out
    out["gbps"], out["tcp_retransmits"] = _iperf(bench, ns, host, iperf_port)
    if t.cpu_seconds:
        # CPU per GB moved: on one 2-core machine every "host" shares the CPUs, so a path that needs
        # more switch work per byte is slower here for that reason alone. -O 1: the omitted first
        # second carries traffic too, hence seconds + 1 (approximate, the same for every path).
        cpu1 = t.cpu_seconds()
        gbytes = out["gbps"] / 8 * (bench.args.iperf_seconds + 1)
        for name, secs in sorted(cpu1.items()):
            out[f"switch_cpu_ms_per_gb_{name}"] = round((secs - cpu0.get(name, secs)) * 1000 / gbytes, 1) if gbytes else 0.0
        out["switch_cpu_ms_per_gb"] = round(sum(v for k, v in out.items() if k.startswith("switch_cpu_ms_per_gb_")), 1)
    if t.tunnel_bytes:
        out["tunnel_mbytes"] = round((t.tunnel_bytes() - tunnel0) / 1e6, 1)
    log(
        f"  {path}: {out['gbps']:.2f} Gbit/s, rtt p50 {out['rtt_ms_p50']:.3f} ms p99 {out['rtt_ms_p99']:.3f} ms, "
        + (f"{out['conn_per_s']:.0f} conn/s ({out['conn_failed']} failed), " if cps is not None else "")
        + f"{out['tcp_retransmits']} retransmits"
        + (f", {out['tunnel_mbytes']} MB sent into tunnels" if t.tunnel_bytes else "")
        + (f", switches {out['switch_cpu_ms_per_gb']} ms CPU/GB" if t.cpu_seconds else "")
    )
    return out


def _cps(bench: Bench, ns: str, host: str, http_port: int) -> dict[str, Any]:
    """New connections/s: bounded in count and time, a few dozen in flight."""
    a = bench.args
    argv = ["cps", "--host", host, "--port", str(http_port), "--count", str(a.cps_count), "--seconds", str(a.cps_seconds),
            "--concurrency", str(a.cps_concurrency)]  # fmt: skip
    return _tool_json(bench, ns, argv, timeout=a.cps_seconds + 15)


def _tool_json(bench: Bench, ns: str, argv: list[str], timeout: float) -> dict[str, Any]:
    """Run a dataplane_tools.py subcommand in ``ns``; its last output line is its JSON result."""
    p = bench.run([python_exe(), str(TOOLS), *argv], ns=ns, timeout=timeout)
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))


def _iperf(bench: Bench, ns: str, host: str, port: int) -> tuple[float, int]:
    """One iperf3 stream: Gbit/s received and the sender's retransmits."""
    secs = bench.args.iperf_seconds
    cmd = ["iperf3", "-c", host, "-p", str(port), "-t", str(secs), "-O", "1", "-J", "--connect-timeout", "3000"]
    last = ""
    for _ in range(3):  # a server that just started may refuse the first attempt
        p = bench.run(cmd, ns=ns, check=False, timeout=secs + 20)
        try:
            data = json.loads(p.stdout)
        except json.JSONDecodeError:
            data = {"error": (p.stderr or p.stdout).strip()[:300]}
        if "error" not in data:
            end = data["end"]
            gbps = end["sum_received"]["bits_per_second"] / 1e9
            return round(gbps, 3), int(end.get("sum_sent", {}).get("retransmits", 0))
        last = str(data["error"])
        time.sleep(1.0)
    raise BenchError(f"iperf3 to {host}:{port} failed: {last}")


# -- reporting -------------------------------------------------------------------

METRICS = (
    ("gbps", "Gbit/s", True),
    ("rtt_ms_p50", "rtt p50 ms", False),
    ("rtt_ms_p99", "rtt p99 ms", False),
    ("conn_per_s", "conn/s", True),
)  # (key, column label, higher is better)


def aggregate(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each figure over the rounds (p99 too: the median round's tail), plus every round's value."""
    out: dict[str, Any] = {}
    for key in rounds[0]:
        values = [r[key] for r in rounds]
        out[key] = round(statistics.median(values), 4) if key not in ("rtt_samples", "conn_failed") else sum(values)
        if key in ("gbps", "rtt_ms_p50", "rtt_ms_p99", "conn_per_s"):
            out.setdefault("per_round", {})[key] = values
    out["rounds"] = len(rounds)
    return out


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``"x/y"`` → metric ratio for every measured pair (x after y in PATHS), direct as the base first."""
    # The multihost paths have their own comparison (cross_host): other clients, other MTU.
    # So have the load-balanced ones (balancing): another lab, no throughput.
    ok = [p for p in PATHS if p in results and "status" not in results[p] and not any(p in g for g in GROUPED)]
    out: dict[str, dict[str, float]] = {}
    for base, other in itertools.combinations(ok, 2):
        r: dict[str, float] = {}
        for key, _label, _hib in METRICS:
            b, o = results[base].get(key), results[other].get(key)
            if isinstance(b, int | float) and isinstance(o, int | float) and b:
                r[key] = round(o / b, 3)
        out[f"{other}/{base}"] = r
    return out


def print_table(results: dict[str, dict[str, Any]], rat: dict[str, dict[str, float]]) -> None:
    """The human-readable table (stdout, before the JSON line): one row a path in PATHS order, then the ratios."""
    width = max([12, *(len(p) for p in results)])
    print(f"{'path':<{width}} " + " ".join(f"{label:>12}" for _k, label, _h in METRICS))
    for p in PATHS:
        r = results.get(p, {})
        if not r:
            continue
        if "status" in r:
            print(f"{p:<{width}} {r['status']}: {r['reason']}")
            continue
        cells = []
        for k, _l, _h in METRICS:
            v = r.get(k)
            cells.append(f"{'-':>12}" if v is None else f"{v:>12.0f}" if k == "conn_per_s" else f"{v:>12.3f}")
        print(f"{p:<{width}} " + " ".join(cells))
    if rat:
        print("ratios (throughput and conn/s: higher is better; rtt: lower is better)")
    for pair, r in rat.items():
        print(f"  {pair:<24} " + "  ".join(f"{k} x{v:.3f}" for k, v in r.items()))
