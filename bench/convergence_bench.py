"""bench/convergence: how long from an API write until the outside world sees it.

In a lab of its own (``python -m portmesh.lab up``, torn down with ``lab down`` at
the end, whatever happens), one container runs a whoami server on port 80 and on
ports BASE..BASE+N-1. Then, one at a time:

- N adds: ``POST /v1/mappings`` (no ``wait``) for IP:port → the container, timed from
  just before the request until a TCP connection from ``inet`` is answered by the
  container (its greeting names it);
- N removals: ``DELETE /v1/mappings/IP/tcp/port``, timed until a connection attempt
  is refused.

The outside client is ``convergence_probe.py`` inside the lab's ``inet`` namespace,
fed one command per line. Printed: median and worst for both, and as the last line
one JSON object with every figure. Only lab namespaces carry traffic; the run is
bounded (N ≤ 1000, 10 s per step) and stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROBE = HERE / "convergence_probe.py"
LAB_ROOT = Path("/run/portmesh")
CONTAINER = "conv"


class BenchError(Exception):
    """The run cannot go on; the message says why."""


def python_exe() -> str:
    """The project venv's interpreter (it has portmesh); the current one otherwise."""
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Api:
    """The few API calls the bench makes (stdlib HTTP: the script runs with any python3)."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base.rstrip("/")
        self.token = token

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as reply:
                return json.loads(reply.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise BenchError(f"{method} {path}: HTTP {exc.code} {exc.read().decode(errors='replace')}") from None


class Probe:
    """The outside client, alive for the whole run inside ``inet``."""

    def __init__(self, netns: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, python_exe(), str(PROBE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise BenchError("the probe in inet died")
        result: dict[str, Any] = json.loads(answer)
        if not result.get("ok"):
            raise BenchError(f"probe `{line}` gave up: {result}")
        return result

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class Run:
    """One benchmark run: its lab, its container, its figures."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lab = args.lab_name
        self.state: dict[str, Any] = {}
        self.owned = False  # set just before `lab up`: only a lab this run started is torn down
        self.env = dict(os.environ)

    def py(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([python_exe(), *argv], env=self.env, capture_output=True, text=True, timeout=timeout)

    def lab_up(self) -> None:
        if (LAB_ROOT / self.lab / "lab.json").exists():
            raise BenchError(f"a lab named {self.lab!r} already exists; not touching it (use --lab-name)")
        t0 = time.monotonic()
        self.owned = True
        done = self.py("-m", "portmesh.lab", "up", "--name", self.lab, "--no-tune-rmem")
        if done.returncode:
            raise BenchError(f"lab up failed: {(done.stderr or done.stdout).strip()[-400:]}")
        self.state = json.loads((LAB_ROOT / self.lab / "lab.json").read_text())
        self.env["PORTMESH_API"] = str(self.state["api_url"])
        self.env["PORTMESH_TOKEN_FILE"] = str(LAB_ROOT / self.lab / "api.token")
        log(f"lab {self.lab} up in {time.monotonic() - t0:.1f} s, API {self.state['api_url']}")

    def lab_down(self) -> None:
        done = self.py("-m", "portmesh.lab", "down", "--name", self.lab, timeout=120)
        log(f"lab {self.lab} down" if done.returncode == 0 else f"lab down failed: {done.stderr.strip()[-300:]}")

    def container(self) -> None:
        ports = range(self.args.base_port, self.args.base_port + self.args.count)
        whoami = [python_exe(), "-m", "portmesh.lab.whoami", "--name", CONTAINER, "--tcp", "80"]
        for port in ports:
            whoami += ["--tcp", str(port)]
        host = str((self.state.get("hosts") or ["h1"])[0])
        argv = ["-m", "portmesh.cli.app", "run", CONTAINER, "--host", host, "--ip", self.args.ip, "--port", "80/tcp"]
        done = self.py(*argv, "--wait", "--", *whoami)
        if done.returncode:
            raise BenchError(f"portmesh run failed: {done.stderr.strip()[-400:]}")

    def measure(self) -> dict[str, Any]:
        api = Api(str(self.state["api_url"]), (LAB_ROOT / self.lab / "api.token").read_text().strip())
        probe = Probe(str(self.state["prefix"]) + "inet")
        ip, count = self.args.ip, self.args.count
        try:
            probe.ask(f"open {ip} 80 {CONTAINER}")  # the container is up and its first mapping is live
            ports = list(range(self.args.base_port, self.args.base_port + count))
            probe.ask(f"closed {ip} {ports[0]}")  # nothing answers an unmapped port yet
            adds, removes, acks = [], [], []
            for port in ports:
                t0 = time.monotonic()
                api.call("POST", "/v1/mappings", {"public_ip": ip, "port": port, "proto": "tcp", "container": CONTAINER})
                acks.append(time.monotonic() - t0)
                adds.append(probe.ask(f"open {ip} {port} {CONTAINER}")["at"] - t0)
            log(f"{count} adds done")
            for port in ports:
                t0 = time.monotonic()
                api.call("DELETE", f"/v1/mappings/{ip}/tcp/{port}")
                removes.append(probe.ask(f"closed {ip} {port}")["at"] - t0)
            log(f"{count} removals done")
        finally:
            probe.close()
        return {
            "adds": count,
            "add_median_ms": ms(statistics.median(adds)),
            "add_worst_ms": ms(max(adds)),
            "remove_median_ms": ms(statistics.median(removes)),
            "remove_worst_ms": ms(max(removes)),
            "removes": count,
            "api_ack_median_ms": ms(statistics.median(acks)),
            "add_p90_ms": ms(statistics.quantiles(adds, n=10)[-1]),
            "remove_p90_ms": ms(statistics.quantiles(removes, n=10)[-1]),
            "within_1s": sum(x <= 1.0 for x in adds + removes),
        }


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/convergence", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--count", type=int, default=100, choices=range(2, 1001), metavar="N", help="adds and removals (2..1000)")
    ap.add_argument("--lab-name", default=f"qconv{os.getpid() % 10000}", help="lab to build (must not exist)")
    ap.add_argument("--ip", default="203.0.113.50", help="public IP of the test container")
    ap.add_argument("--base-port", type=int, default=20000, help="first mapped port")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("bench/convergence builds a lab: run it as root")
        return 2
    run = Run(args)
    try:
        run.lab_up()
        run.container()
        figures = run.measure()
    except (BenchError, subprocess.TimeoutExpired) as exc:
        log(f"bench/convergence: {exc}")
        return 1
    finally:
        if run.owned:
            run.lab_down()
    print(f"mapping add -> answered from inet: median {figures['add_median_ms']} ms, worst {figures['add_worst_ms']} ms")
    print(f"mapping remove -> refused from inet: median {figures['remove_median_ms']} ms, worst {figures['remove_worst_ms']} ms")
    print(json.dumps(figures))
    return 0
