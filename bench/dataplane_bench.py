"""Data-plane benchmark: the same three figures over four paths, in one run.

Figures, each from an outside client namespace to a server namespace:
  - TCP throughput: one iperf3 stream (``-t 5 -O 1``), Gbit/s received;
  - round-trip latency: HTTP request/response over one kept-alive TCP connection,
    median and p99 over a bounded count (bench/dataplane_tools.py ``rr``);
  - new TCP connections per second: connect / request / close with a few dozen in
    flight, bounded in count and time (bench/dataplane_tools.py ``cps``).

Paths:
  direct       a veth pair, client ↔ server (the limit);
  bridge_dnat  client → host ns (iptables DNAT publicIP:8080 → private:80, the rules
               Docker writes for ``-p``) → Linux bridge → container;
  ovs_ctnat    client → one userspace OVS (datapath netdev) → container, the VIP
               mapped by conntrack DNAT flows (ct(nat)), as an OVN load balancer does;
  portmesh     the product: ``python -m portmesh.lab up``, ``portmesh run``, traffic
               from the lab's inet namespace to the container's public IP, no NAT.
  portmesh_ebpf  the same on a lab whose host runs the eBPF datapath (``lab up --datapath
               ebpf``; bench/dataplane_ebpf.py); ``targets`` in the JSON: eBPF and OVS
               against bridge_dnat and direct.
  portmesh_open  the same product with its host isolation taken away after set-up
               (agent stopped, nftables tables ``portmesh`` deleted in the host
               namespace): the "before" of issue 11, to price the isolation.
               Not in the default set (``--paths ...,portmesh_open``).
  mh_*         across hosts (``--paths multihost``; bench/dataplane_multihost.py): one
               3-host lab, container to container on one host and on two hosts, inet to
               a container on the gateway host and on a compute host, throughput and RTT,
               always built and measured together; ``cross_host`` in the JSON holds the
               cross/same ratios (target >= 0.8). Not in the default set.
  mh_ebpf_*    the same four on a 3-host eBPF lab (``--paths multihost_ebpf``).
  lb_*         load balancing (``--paths balancing``; bench/dataplane_balancing.py): one
               one-host lab, new connections/s and RTT through a mapping of 3 backends
               (lb_three) next to a plain one-backend mapping (lb_single), rounds
               alternating; ``balancing`` in the JSON holds the ratio (target >= 0.9).

Everything lives in namespaces named ``pmb-<pid>-*`` (so runs never collide with the
lab, the tests or each other); addresses come only from 198.51.100.0/24 (outside),
203.0.113.0/24 (public) and 198.18.0.0/15 (private side). The root namespace gets
nothing except, unless ``--rmem-default 0``, a raised ``net.core.rmem_default`` (OVS
reads each port through a packet socket sized by it; ARCHITECTURE.md, facts), which
is recorded and put back. Cleanup — processes by PID, namespaces by name, the lab,
the sysctl — runs in a ``finally``, also on Ctrl-C / SIGTERM.

Each path is built, measured ``--rounds`` times (median reported, every round kept
under ``per_round``) and torn down before the next, so each runs with only its own
machinery alive; ``--interleave`` builds all first and alternates instead. The load
average before/after is recorded: on a shared 2-CPU machine, compare ratios from the
same run only. ``--cleanup-stale`` removes what a SIGKILLed run left behind.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dataplane_common import (
    DEFAULT_PATHS,
    GROUPED,
    HTTP_PORT,
    IPERF_PORT,
    LB_EBPF_PATHS,
    LB_PATHS,
    MH_EBPF_PATHS,
    MH_PATHS,
    PATHS,
    TOOLS,
    BenchError,
    Target,
    log,
    python_exe,
)
from dataplane_measure import aggregate, measure, print_table, ratios
from dataplane_reference import REFERENCE

HERE = Path(__file__).resolve().parent
ALIASES = {"multihost": MH_PATHS, "multihost_ebpf": MH_EBPF_PATHS, "balancing": LB_PATHS, "balancing_ebpf": LB_EBPF_PATHS}
RMEM_SYSCTL = Path("/proc/sys/net/core/rmem_default")


class Bench:
    """Owns every resource a run creates, so :meth:`cleanup` removes exactly those."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.prefix = f"{args.prefix}{os.getpid()}-"
        self.tmp = Path(tempfile.mkdtemp(prefix="pmb-dataplane-"))
        self.namespaces: list[str] = []
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.rmem_saved: int | None = None
        self.rmem_used = int(RMEM_SYSCTL.read_text())
        self.lab_up = False
        self.notes: list[str] = []
        self.cleanup_hooks: list[Callable[[], object]] = []

    # -- plumbing helpers -------------------------------------------------------

    def run(
        self,
        cmd: Sequence[str],
        ns: str | None = None,
        check: bool = True,
        timeout: float = 30.0,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
        p = subprocess.run(full, capture_output=True, text=True, timeout=timeout, env=env)
        if check and p.returncode != 0:
            raise BenchError(f"{' '.join(full)} -> rc {p.returncode}: {(p.stderr or p.stdout).strip()}")
        return p

    def ns(self, name: str) -> str:
        full = self.prefix + name
        self.run(["ip", "netns", "add", full])
        self.namespaces.append(full)
        self.run(["ip", "-n", full, "link", "set", "lo", "up"])
        return full

    def veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str, mac_a: str | None = None, mac_b: str | None = None) -> None:
        """A veth pair made directly inside the two namespaces: no end ever touches the root ns."""
        cmd = ["ip", "-n", ns_a, "link", "add", if_a]
        if mac_a:
            cmd += ["address", mac_a]
        cmd += ["type", "veth", "peer", "name", if_b, "netns", ns_b]
        if mac_b:
            cmd += ["address", mac_b]
        self.run(cmd)
        self.run(["ip", "-n", ns_a, "link", "set", if_a, "up"])
        self.run(["ip", "-n", ns_b, "link", "set", if_b, "up"])

    def addr(self, ns: str, ifname: str, cidr: str) -> None:
        self.run(["ip", "-n", ns, "addr", "add", cidr, "dev", ifname])

    def sysctl(self, ns: str, key: str, value: str) -> None:
        self.run(["sysctl", "-qw", f"{key}={value}"], ns=ns)

    def spawn(
        self, tag: str, cmd: Sequence[str], ns: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a long-lived process (own session, so Ctrl-C reaches only us); record its PID."""
        full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
        logf = open(self.tmp / f"{tag}.log", "wb")  # noqa: SIM115 - lives as long as the process
        p = subprocess.Popen(
            full, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env
        )
        logf.close()
        self.procs.append((tag, p))
        return p

    def log_tail(self, tag: str, lines: int = 8) -> str:
        try:
            return "\n".join((self.tmp / f"{tag}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_listen(self, ns: str, port: int, tag: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run(["ss", "-Hltn", f"sport = :{port}"], ns=ns, check=False).stdout
            if out.strip():
                return
            time.sleep(0.05)
        raise BenchError(f"{tag} is not listening on :{port} after {timeout}s: {self.log_tail(tag)}")

    def start_servers(self, ns: str, tag: str) -> None:
        self.spawn(f"{tag}-http", [python_exe(), str(TOOLS), "server", "--port", str(HTTP_PORT)], ns=ns)
        self.spawn(f"{tag}-iperf3", ["iperf3", "-s", "-p", str(IPERF_PORT)], ns=ns)
        self.wait_listen(ns, HTTP_PORT, f"{tag}-http")
        self.wait_listen(ns, IPERF_PORT, f"{tag}-iperf3")

    def client_ns(self, name: str) -> str:
        """The outside client: wide ephemeral range and TIME_WAIT reuse so the connection loop is not port-bound."""
        ns = self.ns(name)
        self.sysctl(ns, "net.ipv4.ip_local_port_range", "1024 65000")
        self.sysctl(ns, "net.ipv4.tcp_tw_reuse", "1")
        return ns

    def path(self, name: str) -> Target:
        """Build path ``name``: a reference path (dataplane_reference.py), or a module of its own for the
        product's lab paths."""
        if name in MH_PATHS or name in MH_EBPF_PATHS:
            from dataplane_multihost import shared

            return shared(self, ebpf=name in MH_EBPF_PATHS).target(name)
        if name in LB_PATHS or name in LB_EBPF_PATHS:
            from dataplane_balancing import shared as balancing_lab

            return balancing_lab(self, ebpf=name in LB_EBPF_PATHS).target(name)
        if name == "portmesh_ebpf":
            from dataplane_ebpf import EbpfPath

            return EbpfPath(self).setup()
        if name == "portmesh":
            from dataplane_portmesh import PortmeshPath  # local helper; keeps the product-specific glue apart

            return PortmeshPath(self).setup()
        if name == "portmesh_open":
            from dataplane_portmesh import PortmeshOpenPath

            return PortmeshOpenPath(self).setup()
        return REFERENCE[name](self)

    # -- lifecycle --------------------------------------------------------------

    def set_rmem(self) -> None:
        want = self.args.rmem_default
        if not want:
            return
        current = int(RMEM_SYSCTL.read_text())
        if current != want:
            self.rmem_saved = current
            RMEM_SYSCTL.write_text(str(want))
            log(f"net.core.rmem_default {current} -> {want} (put back at the end)")
        self.rmem_used = want

    def mark(self) -> tuple[int, int, int]:
        """A point to :meth:`release` back to: what exists now is kept, what comes after goes."""
        return len(self.cleanup_hooks), len(self.procs), len(self.namespaces)

    def release(self, mark: tuple[int, int, int] = (0, 0, 0)) -> None:
        """Remove what was made after ``mark`` (hooks, processes by PID, namespaces by name); never raises."""
        hooks, procs, namespaces = self.cleanup_hooks[mark[0] :], self.procs[mark[1] :], self.namespaces[mark[2] :]
        del self.cleanup_hooks[mark[0] :], self.procs[mark[1] :], self.namespaces[mark[2] :]
        for hook in reversed(hooks):
            with contextlib.suppress(Exception):
                hook()
        for _tag, p in reversed(procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
        for _tag, p in reversed(procs):
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=3)
        for ns in reversed(namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def cleanup(self) -> None:
        """Remove exactly what this run made, in reverse order, and put the sysctl back; never raises."""
        self.release()
        if self.rmem_saved is not None:
            with contextlib.suppress(OSError):
                RMEM_SYSCTL.write_text(str(self.rmem_saved))
                log(f"net.core.rmem_default restored to {self.rmem_saved}")
        if not self.args.keep_logs:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            log(f"logs kept in {self.tmp}")


def cleanup_stale(prefix: str, lab_name: str) -> None:
    """Remove what an earlier run killed with SIGKILL left: ``<prefix><pid>-*`` namespaces whose run is
    gone (their processes by PID first) and the lab ``lab_name`` if it still exists."""
    pat = re.compile(rf"^{re.escape(prefix)}(\d+)-")
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        m = pat.match(name)
        if not m or Path(f"/proc/{m.group(1)}").exists():
            continue
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        log(f"removed stale namespace {name} ({len(pids)} process(es) killed)")
    if Path(f"/run/portmesh/{lab_name}/lab.json").exists():
        done = subprocess.run(
            [python_exe(), "-m", "portmesh.lab", "down", "--name", lab_name], capture_output=True, text=True, timeout=120
        )
        log(f"lab {lab_name!r} down: rc {done.returncode}")


def run_group(bench: Bench, paths: list[str]) -> dict[str, dict[str, Any]]:
    """Build ``paths``, measure them ``--rounds`` times (alternating), return each one's result."""
    results: dict[str, dict[str, Any]] = {}
    targets: dict[str, Target] = {}
    for path in paths:
        log(f"setting up {path}")
        try:
            targets[path] = bench.path(path)
        except BenchError as e:
            log(f"{path}: unavailable: {e}")
            results[path] = {"status": "unavailable", "reason": str(e)}
    rounds: dict[str, list[dict[str, Any]]] = {p: [] for p in targets}
    for r in range(bench.args.rounds):
        for path, target in list(targets.items()):
            log(f"{path}: round {r + 1}/{bench.args.rounds}")
            try:
                rounds[path].append(measure(bench, path, target))
            except BenchError as e:
                log(f"{path}: unavailable: {e}")
                results[path] = {"status": "unavailable", "reason": f"measurement failed: {e}"}
                del targets[path]
    for path, target in targets.items():
        results[path] = aggregate(rounds[path])
        with contextlib.suppress(BenchError, subprocess.SubprocessError, OSError):
            results[path].update(target.extra())
    return results



def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--paths",
        default=",".join(DEFAULT_PATHS),
        help=f"comma-separated subset of {','.join(PATHS)}; 'multihost' = mh_* on OVS, 'multihost_ebpf' = on eBPF, "
        "'balancing' / 'balancing_ebpf' = lb_* on OVS / eBPF",
    )
    p.add_argument("--prefix", default="pmb-", help="namespace prefix; the PID is appended (default pmb-)")
    p.add_argument("--rounds", type=int, default=3, help="measure every path this many times; medians")
    p.add_argument("--interleave", action="store_true", help="build every path first and alternate between them")
    p.add_argument("--iperf-seconds", type=int, default=5)
    p.add_argument("--rr-count", type=int, default=3000)
    p.add_argument("--rr-seconds", type=float, default=5.0)
    p.add_argument("--cps-count", type=int, default=20000)
    p.add_argument("--cps-seconds", type=float, default=3.0)
    p.add_argument("--cps-concurrency", type=int, default=32)
    p.add_argument(
        "--rmem-default",
        type=int,
        default=4 * 1024 * 1024,
        help="net.core.rmem_default during the run (bytes; 0 leaves it alone); restored afterwards",
    )
    p.add_argument("--lab-name", default="bench", help="name for `portmesh.lab up --name`")
    p.add_argument("--lab-timeout", type=float, default=60.0, help="seconds to wait for the lab and containers")
    p.add_argument("--keep-logs", action="store_true")
    p.add_argument(
        "--cleanup-stale",
        action="store_true",
        help="only remove what a killed earlier run left (namespaces of dead runs, the bench lab)",
    )
    a = p.parse_args(argv)
    names = (x.strip() for x in a.paths.split(",") if x.strip())
    a.paths = list(dict.fromkeys(n for name in names for n in ALIASES.get(name, (name,))))
    bad = set(a.paths) - set(PATHS)
    if bad:
        p.error(f"unknown path(s): {', '.join(sorted(bad))}")
    return a


def _sigterm(_signo: int, _frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals() -> Iterator[None]:
    # Installed explicitly: a shell that starts us in the background leaves SIGINT ignored,
    # and Ctrl-C / SIGTERM / SIGHUP must all reach the `finally` that cleans up.
    olds = {
        s: signal.signal(s, h)
        for s, h in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, _sigterm), (signal.SIGHUP, _sigterm))
    }
    try:
        yield
    finally:
        for s, h in olds.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/dataplane needs root (namespaces, OVS, iptables)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    if args.cleanup_stale:
        cleanup_stale(args.prefix, args.lab_name)
        return 0
    bench = Bench(args)
    results: dict[str, dict[str, Any]] = {}
    t0 = time.monotonic()
    load_before = round(os.getloadavg()[0], 2)
    interrupted = False
    with _signals():
        try:
            bench.set_rmem()
            # Build every path first, then measure them interleaved, round after round: a burst of
            # load from elsewhere on the machine then hits every path alike instead of one.
            # Default: each path is built, measured (all rounds) and torn down before the next, so
            # each runs with only its own machinery alive (a busy control plane costs only its own
            # path). --interleave builds all first and alternates, so load bursts from elsewhere
            # hit every path alike.
            # The multihost paths share one 3-host lab and are compared with each other: always one group.
            # So do the load-balanced ones (one lab, rounds alternating between one and three backends).
            shared = [[p for p in args.paths if p in grouped] for grouped in GROUPED]
            rest = [p for p in args.paths if not any(p in grouped for grouped in GROUPED)]
            groups = [rest] if args.interleave and rest else [[p] for p in rest]
            groups += [group for group in shared if group]
            for group in groups:
                mark = bench.mark()
                try:
                    results.update(run_group(bench, group))
                finally:
                    bench.release(mark)
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted; cleaning up")
        finally:
            bench.cleanup()
    if load_before > 0.5 * (os.cpu_count() or 1):
        bench.notes.append(
            f"the machine was busy before the run (1-min load {load_before} on {os.cpu_count()} CPUs): "
            "figures are depressed and noisy; compare ratios from the same run only"
        )
    rat = ratios(results)
    print_table(results, rat)
    cross: dict[str, Any] = {}
    if any(p in results for p in (*MH_PATHS, *MH_EBPF_PATHS)):
        from dataplane_multihost import cross_host, print_cross_host

        cross = {**cross_host(results), **cross_host(results, ebpf=True)}
        print_cross_host(cross)
    from dataplane_ebpf import print_targets, targets

    goals = targets(results)
    print_targets(goals)
    lb: dict[str, Any] = {}
    lb_ebpf: dict[str, Any] = {}
    if any(p in results for p in (*LB_PATHS, *LB_EBPF_PATHS)):
        from dataplane_balancing import balancing, print_balancing

        lb, lb_ebpf = balancing(results), balancing(results, "lb_ebpf_")
        print_balancing(lb)
        print_balancing(lb_ebpf, "balancing on eBPF")
    for note in dict.fromkeys(bench.notes):  # once each (both portmesh paths note the MTU)
        print(f"note: {note}")
    summary: dict[str, Any] = {
        **results,
        "ratios": rat,
        **({"cross_host": cross} if cross else {}),
        **({"balancing": lb} if lb else {}),
        **({"balancing_ebpf": lb_ebpf} if lb_ebpf else {}),
        **({"targets": goals} if goals else {}),
        "rmem_default": bench.rmem_used,
        "seconds": round(time.monotonic() - t0, 1),
        "loadavg_1m": {"before": load_before, "after": round(os.getloadavg()[0], 2)},
        "cpus": os.cpu_count(),
    }
    if interrupted:
        summary["interrupted"] = True
    print(json.dumps(summary, sort_keys=False))
    return 130 if interrupted else 0
