"""The real ``portmesh`` command over a corpus of hostile input: never a traceback, always a one-line reason.

Each case runs ``.venv/bin/portmesh`` as a subprocess (the console script a user runs, not
CliRunner) against the API served over HTTP (fake store), or against an address where
nothing listens. A case fails on any "Traceback" in stdout or stderr, and, where the
input is bad, on exit status 0 or an error without the ``error:``/``Error:`` line.
Lab commands here are refused before they touch anything (bad names, bad counts, a lab
that is not up); ``lab exec NODE -- nosuchcmd`` needs a real lab (tests/lab/test_cli_lab.py). The entry
points' catch-all ("error: unexpected ...") counts as a failure here: it hides a missing check.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from portmesh.model.entities import Host
from tests.unit.fakes import FakeStore
from tests.unit.test_cli import IP, TOKEN, Server

PORTMESH = str(Path(sys.executable).parent / "portmesh")
HUGE = "9" * 40
LONG = "a" * 5000

BAD_NAMES = [".", "..", "%2F", "%2e%2e", "a/b", "", " ", "Web", "ünï", "web\n", "-", LONG, "../hosts", "web?x=1", "web#f"]


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    bad: bool = True  # a non-zero exit is required
    token_file: str | None = None


def cases() -> list[Case]:
    """Every bad name, port and IP once, rotating through the commands that take it (each run costs ~1 s)."""
    verbs = [["inspect"], ["inspect", "-o", "json"], ["logs"], ["stop"], ["start"], ["rm"], ["exec", "--", "true"]]
    out = [Case((verb[0], name, *verb[1:])) for i, name in enumerate(BAD_NAMES) for verb in [verbs[i % len(verbs)]]]
    out += [Case(("inspect", ".", "-o", "json")), Case(("logs", ".")), Case(("stop", ".")), Case(("rm", ".."))]
    out += [Case(("run", "Bad_Name", "--host", "h1", "--ip", IP)), Case(("map", "add", IP, "80/tcp", ".."))]
    port_verbs: list[Callable[[str], tuple[str, ...]]] = [
        lambda p: ("run", "web2", "--host", "h1", "--ip", IP, "-p", p),
        lambda p: ("map", "add", IP, p, "web"),
        lambda p: ("map", "rm", IP, p),
    ]
    ports = ["99999/tcp", "0/tcp", "-1", "x", "", "80/sctp", "/tcp", f"{HUGE}/udp", "1.2.3.4:80", ":80", "80:80"]
    out += [Case(port_verbs[i % 3](port)) for i, port in enumerate(ports)]
    ips = ["999.1.1.1", "", "x", "::1", "203.0.113.10/24", HUGE]
    ip_verbs: list[Callable[[str], tuple[str, ...]]] = [
        lambda ip: ("run", "web2", "--host", "h1", "--ip", ip),
        lambda ip: ("map", "rm", f"{ip}:80/tcp"),
    ]
    out += [Case(ip_verbs[i % 2](ip)) for i, ip in enumerate(ips)]
    out += [
        Case(("inspect", "web"), bad=False),  # its command holds "[/]" and rich markup
        Case(("inspect", "web", "-o", "json"), bad=False),
        Case(("ps",), bad=False),
        Case(("ps", "-a", "-q"), bad=False),
        Case(("inspect", "web", ".", "ghost")),
        Case(("run", "web2", "--host", "h1", "--ip", IP, "--timeout", "0")),
        Case(("run", "web2", "--host", "h1", "--ip", IP, "--timeout", "nan")),
        Case(("run", "web2", "--host", "h1", "--ip", IP, "--timeout", "inf")),
        Case(("run", "web2", "--host", "ghost", "--ip", IP)),
        Case(("run", "web2", "--host", "h1", "--ip", IP, "--image", "")),
        Case(("run", "web", "--host", "h1", "--ip", IP)),  # exists: 409
        Case(("run",)),
        Case(("run", "web2")),
        Case(("logs", "web", "--tail", "-1")),
        Case(("logs", "web", "--tail", HUGE)),
        Case(("exec", "web")),
        Case(("exec", "web", "--")),
        Case(("exec", "ghost", "--", "true")),
        Case(("exec", "web", "--", "true")),  # no status reported: nothing to enter
        Case(("map", "add", IP)),
        Case(("map", "add", IP, "80/tcp", "web", "x")),
        Case(("map", "rm", IP, "81/tcp")),  # no such mapping
        Case(("ps", "--bogus")),
        Case(("ps", "-o", "yaml")),
        Case(("frobnicate",)),
        Case(("--api", "not a url", "ps")),
        Case(("--api", "http://[::1", "ps")),
        Case(("--api", "ftp://127.0.0.1:1", "ps")),
        Case(("ps",), token_file="/etc"),  # a directory
        Case(("ps",), token_file="/nonexistent/token"),  # none: 401
        Case(("ps",), token_file="BINARY"),
        Case(("ps",), token_file="NEWLINES"),
        Case(("lab", "status", "--name", "Bad_Name")),
        Case(("lab", "up", "--hosts", HUGE)),
        Case(("lab", "env", "--name", "nosuch-lab")),
        Case(("lab", "exec", "--name", "nosuch-lab", "inet", "--", "true")),
        Case(("lab", "exec", "--name", "Bad_Name", "inet", "--", "true")),
        Case(("down", "--name", "..")),
    ]
    return out + cloud_cases() + balancing_cases()


def balancing_cases() -> list[Case]:
    """Issue 15's options: backends, weights, policy, health check; refused by the CLI (2) or the API (1)."""
    add = ("map", "add", IP, "80/tcp", "web")
    out = [Case((*add, "--weight", w)) for w in ("web=0", "web=-1", f"web={HUGE}", "web", "=2", "ghost=2", "web=2x", "web=٢")]
    nets = ["", "x", "198.51.100.1/24", HUGE, "::/0", f"198.51.100.0/{HUGE}", "198.51.100.0/24/8", LONG]
    out += [Case((*add, "--allow" if i % 2 else "--deny", n)) for i, n in enumerate(nets)]
    healths = ["", "udp", "tcp:", "tcp:/x", "http:", "http:x", f"http:/={HUGE}", "http:/=99", "http:/ x", f"http:/{LONG}", "HTTP"]
    out += [Case((*add, "--health", h)) for h in healths]
    for option, values in (
        ("--health-interval", ["0", "-1", "nan", "inf", HUGE]),
        ("--health-timeout", ["0", "nan", "5"]),
        ("--health-threshold", ["0", "11", HUGE]),
        ("--health-port", ["-1", "65536", HUGE]),
    ):
        out += [Case((*add, "--health", "tcp", option, v)) for v in values]
    out += [
        Case((*add, "--health-interval", "2")),  # without --health
        Case(("map", "add", IP, "80/tcp", "web", "web")),
        Case(("map", "add", IP, "81/tcp", "web", "ghost")),  # the API's 404
        Case(("map", "add", IP, "80/tcp", "web", ".")),
        Case(("map", "backend", "add", IP, "80/tcp", "..")),
        Case(("map", "backend", "add", IP, "80/tcp", "ghost")),
        Case(("map", "backend", "add", IP, "80/tcp", "web")),  # already one: 409
        Case(("map", "backend", "add", IP, "80/tcp", "web", "--weight", HUGE)),
        Case(("map", "backend", "add", IP, "80/tcp")),
        Case(("map", "backend", "add", IP, "81/tcp", "web")),  # no such mapping
        Case(("map", "backend", "rm", IP, "80/tcp", "web")),  # the last one: 409
        Case(("map", "backend", "rm", IP, "80/tcp", "%2F")),
        Case(("map", "backend", "rm", f"{HUGE}:80/tcp", "web")),
        Case(("map", "backend", "frob")),
        Case(("map", "policy", IP, "80/tcp")),
        Case(("map", "policy", IP, "80/tcp", "--allow", "::/0")),
        Case(("map", "policy", IP, "81/tcp", "--clear")),
        Case(("map", "policy", IP, f"{HUGE}/tcp", "--clear")),
        Case(("map", "inspect", IP, "81/tcp")),
        Case(("map", "inspect", IP, "x")),
        Case(("map", "inspect", "x")),
        Case(("map", "inspect", IP, "80/tcp", "-o", "yaml")),
        Case(("map", "health", IP, "80/tcp")),
        Case(("map", "health", IP, "80/tcp", "--none", "--health", "tcp")),
        Case(("map", "health", IP, "80/tcp", "--health", "http:/=0")),
        Case(("map", "health", IP, "81/tcp", "--none")),  # no such mapping: the API's 404
        Case(("map", "backend", "weight", IP, "80/tcp", "web", HUGE)),
        Case(("map", "backend", "weight", IP, "80/tcp", "web", "-1")),
        Case(("map", "backend", "weight", IP, "80/tcp", "ghost", "2")),  # not a backend: the API's 422
        Case(("map", "backend", "weight", IP, "80/tcp")),
        Case(("map", "inspect", IP, "80/tcp"), bad=False),
        Case(("map", "inspect", f"{IP}:80/tcp", "-o", "json"), bad=False),
        Case(("map", "ls"), bad=False),
    ]
    return out


def cloud_cases() -> list[Case]:
    """Hosts, pools and config: bad input refused by the CLI (exit 2) or by the API (exit 1), nothing written."""
    ul = "198.19.0.20"
    out = [Case(("host", "add", name, "--underlay-ip", ul)) for name in BAD_NAMES[::3]]
    out += [Case(("host", "rm", name)) for name in BAD_NAMES[1::3]]
    out += [Case(("host", "add", "h9", "--underlay-ip", ip)) for ip in ("", "x", "999.1.1.1", "::1", HUGE, "198.19.0.0/24")]
    out += [
        Case(("host", "add", "h9", "--underlay-ip", IP)),  # in a public pool: the API's 422
        Case(("host", "add", "h9", "--underlay-ip", "0.0.0.0")),
        Case(("host", "add", "h1", "--underlay-ip", ul)),  # exists: 409
        Case(("host", "add", "h9", "--underlay-ip", ul, "--role", "router")),
        Case(("host", "add", "h9", "--underlay-ip", ul, "--datapath-id", HUGE)),
        Case(("host", "add", "h9", "--underlay-ip", ul, "--datapath-id", "0")),
        Case(("host", "add", "h9", "--underlay-ip", ul, "--datapath-id", "1")),  # h1's: 409
        Case(("host", "add", "h9")),
        Case(("host", "rm", "ghost")),
        Case(("host", "rm", "h1")),  # holds web: 409
    ]
    cidrs = ["", "x", "198.51.100.1/24", HUGE, f"198.51.100.0/{HUGE}", "198.51.100.0/-1", "::/0", "198.51.100.0/24/8", "/24"]
    out += [Case(("pool", "add" if i % 2 else "rm", c)) for i, c in enumerate(cidrs)]
    out += [
        Case(("pool", "add", "203.0.113.0/24")),  # exists: overlap, 409
        Case(("pool", "add", "0.0.0.0/0")),  # the API's 422: too large
        Case(("pool", "add", "127.0.0.0/8")),
        Case(("pool", "rm", "198.51.100.0/24")),  # not a pool: 404
        Case(("pool", "rm", "203.0.113.0/24")),  # web holds an IP of it: 409
        Case(("pool", "ls", "-o", "yaml")),
        Case(("pool", "ls"), bad=False),
        Case(("pool", "ls", "-o", "json"), bad=False),
        Case(("config", "show"), bad=False),
        Case(("config", "show", "-o", "json"), bad=False),
        Case(("hosts", "-o", "json"), bad=False),
    ]
    values = [("nope", "1"), ("public_pools", "198.51.100.0/24"), ("block_size", HUGE), ("block_size", "-1"),
              ("block_size", ""), ("vxlan_vni", "0x10"), ("container_mtu", "\u0661\u0664\u0660\u0660"),
              ("gateway_ip", ""), ("gateway_ip", "10.0.0.1"), ("protected_networks", ","),
              ("protected_networks", "0.0.0.0/0"), ("protected_networks", "203.0.113.0/24"), ("block_size", "512")]
    out += [Case(("config", "set", k, v)) for k, v in values]
    out += [Case(("config", "set", "block_size")), Case(("config", "set"))]
    return out


@dataclass(frozen=True)
class Ran:
    case: Case
    code: int
    stdout: str
    stderr: str


def run_case(case: Case, api: str, tmp: Path) -> Ran:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTMESH_")}
    env["PORTMESH_API"] = api
    if case.token_file is None:
        env["PORTMESH_TOKEN"] = TOKEN
    else:
        env["PORTMESH_TOKEN_FILE"] = {"BINARY": str(tmp / "binary"), "NEWLINES": str(tmp / "newlines")}.get(
            case.token_file, case.token_file
        )
    done = subprocess.run([PORTMESH, *case.args], env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    return Ran(case, done.returncode, done.stdout, done.stderr)


def problems(ran: Ran) -> list[str]:
    found = []
    if "Traceback" in ran.stdout or "Traceback" in ran.stderr:
        found.append("traceback")
    if "error: unexpected " in ran.stderr:
        found.append(f"only the last line of defence caught it: {ran.stderr.strip()[:200]}")
    if ran.case.bad:
        if ran.code == 0:
            found.append("exit 0 on bad input")
        last = ran.stderr.strip().splitlines()[-1:] or [""]
        if not last[0].startswith(("error:", "Error:")):
            found.append(f"no error line (last stderr line: {last[0][:200]!r})")
    elif ran.code != 0:
        found.append(f"exit {ran.code} on good input: {ran.stderr.strip()[:200]}")
    return found


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with Server(FakeStore(auto_converge=True)) as s:
        s.store.add_host(Host("h1", 1))
        yield s


def seed(server: Server) -> None:
    from typer.testing import CliRunner

    from portmesh.cli import app as cli

    env = {"PORTMESH_API": server.url, "PORTMESH_TOKEN": TOKEN}
    args = ["run", "web", "--host", "h1", "--ip", IP, "-p", "80/tcp", "--", "sh", "-c", "echo [/] [bold]x[/] :ab:"]
    r = CliRunner().invoke(cli.app, args, env=env)
    assert r.exit_code == 0, r.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("where", ["live", "unreachable"])
def test_no_traceback_for_any_hostile_input(server: Server, tmp_path: Path, where: str) -> None:
    if where == "live" and "web" not in server.store.snapshot().containers:
        seed(server)
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00token\x80")
    (tmp_path / "newlines").write_text("tok\nen\r\nx\x00")
    api = server.url if where == "live" else f"http://127.0.0.1:{free_port()}"
    corpus = cases()
    if where == "unreachable":  # the API's absence must be a one-line error too, for whatever reaches it
        corpus = [Case(c.args) for c in corpus if c.args[0] in ("ps", "inspect", "exec", "logs") and not c.bad]
        corpus += [Case(("run", "web2", "--host", "h1", "--ip", IP)), Case(("map", "add", IP, "80/tcp", "web"))]
        corpus += [Case(("status",)), Case(("hosts",)), Case(("map", "ls")), Case(("logs", "-f", "web"))]
        corpus += [Case(("map", "inspect", IP, "80/tcp")), Case(("map", "policy", IP, "80/tcp", "--clear"))]
        corpus += [Case(("map", "backend", "add", IP, "80/tcp", "web")), Case(("map", "backend", "rm", IP, "80/tcp", "web"))]
        corpus += [Case(("pool", "ls")), Case(("config", "show")), Case(("pool", "add", "198.51.100.0/24"))]
        corpus += [Case(("host", "add", "h9", "--underlay-ip", "198.19.0.20")), Case(("config", "set", "vxlan_port", "4790"))]
    writes = server.store.writes
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda c: run_case(c, api, tmp_path), corpus))
    failures = [f"portmesh {' '.join(map(repr, r.case.args))} -> exit {r.code}: {p}" for r in results for p in problems(r)]
    assert not failures, f"{len(failures)} of {len(corpus)} cases:\n" + "\n".join(failures[:40])
    assert server.store.writes == writes, "hostile input changed nothing"
    if where == "live":
        shown = next(r for r in results if r.case.args == ("inspect", "web"))
        assert "sh -c 'echo [/] [bold]x[/] :ab:'" in shown.stdout, shown.stdout
