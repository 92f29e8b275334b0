"""The CLI end to end over real HTTP: the API (fake store) served by uvicorn on a loopback port."""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from typer.testing import CliRunner, Result

from portmesh.api.app import create_app
from portmesh.cli import app as cli
from portmesh.model.entities import Host
from tests.unit.fakes import FakeStore

TOKEN = "cli-test-token"
LOG_DIR = tempfile.mkdtemp(prefix="pm-cli-test-logs-")  # the API reads *.log files only under its log dirs
IP = "203.0.113.10"


class Server:
    """uvicorn in a thread on a free loopback port; stops when the test ends."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        api = create_app(store, TOKEN, wait_timeout=2.0, log_dirs=[LOG_DIR])
        config = uvicorn.Config(api, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture
def store() -> FakeStore:
    return FakeStore(auto_converge=True)


@pytest.fixture
def server(store: FakeStore) -> Iterator[Server]:
    with Server(store) as s:
        yield s


@pytest.fixture
def invoke(server: Server) -> Any:
    runner = CliRunner()

    def run(*args: str, token: str | None = TOKEN) -> Result:
        env = {"PORTMESH_API": server.url, "PORTMESH_TOKEN": token or "", "PORTMESH_TOKEN_FILE": "/nonexistent"}
        return runner.invoke(cli.app, list(args), env=env)

    return run


def setup_host(server: Server) -> None:
    server.store.add_host(Host("h1", 1))


def test_run_ps_inspect_rm(invoke: Any, server: Server) -> None:
    setup_host(server)
    r = invoke("run", "web", "--host", "h1", "--ip", IP, "-p", "80/tcp", "-p", "53/udp", "--", "sleep", "-x", "9")
    assert r.exit_code == 0, r.output
    assert "web created on h1" in r.stdout and "live everywhere" in r.stdout
    c = server.store.snapshot().containers["web"]
    assert c.command == ("sleep", "-x", "9")
    assert len(server.store.snapshot().mappings) == 2

    r = invoke("ps")
    assert r.exit_code == 0 and "web" in r.stdout and "80/tcp" in r.stdout
    r = invoke("ps", "-o", "json")
    assert [c["name"] for c in json.loads(r.stdout)] == ["web"]
    r = invoke("inspect", "web")
    assert r.exit_code == 0 and "32768-33791" in r.stdout
    assert json.loads(invoke("inspect", "web", "-o", "json").stdout)["mac"] == c.mac

    assert invoke("stop", "web").exit_code == 0
    assert not server.store.container_running("web")
    assert invoke("start", "web", "--no-wait").exit_code == 0
    assert server.store.container_running("web")
    r = invoke("rm", "web", "-o", "json")
    assert r.exit_code == 0 and json.loads(r.stdout)["converged"] is True
    assert server.store.snapshot().containers == {}


def test_map_commands(invoke: Any, server: Server) -> None:
    setup_host(server)
    assert invoke("run", "web", "--host", "h1", "--ip", IP).exit_code == 0
    r = invoke("map", "add", IP, "8080/tcp", "web")
    assert r.exit_code == 0, r.output
    assert f"{IP}:8080/tcp -> web" in r.stdout
    [m] = json.loads(invoke("map", "ls", "-o", "json").stdout)
    assert (m["public_ip"], m["proto"], m["port"], m["container"]) == (IP, "tcp", 8080, "web")
    assert m["backends"] == [{"container": "web", "weight": 1, "health": "unchecked"}]
    assert invoke("map", "rm", IP, "8080").exit_code == 0
    assert server.store.snapshot().mappings == {}


def test_api_errors_exit_1_naming_the_field(invoke: Any, server: Server) -> None:
    setup_host(server)
    r = invoke("run", "web", "--host", "nope", "--ip", IP)
    assert r.exit_code == 1
    assert "host:" in r.stderr and "does not exist" in r.stderr and "404" in r.stderr
    r = invoke("run", "web", "--host", "h1", "--ip", IP, "-p", "70000/tcp")
    assert r.exit_code == 2 and "'--port' / '-p'" in r.stderr and "70000 is outside 1-65535" in r.stderr, "checked here"
    r = invoke("map", "rm", IP, "80/tcp")
    assert r.exit_code == 1 and "mapping:" in r.stderr
    r = invoke("inspect", "ghost")
    assert r.exit_code == 1 and "name:" in r.stderr
    assert r.stdout == ""
    assert server.store.writes == 1  # only the host


def test_missing_token_is_401_with_a_hint(invoke: Any, server: Server) -> None:
    setup_host(server)
    r = invoke("run", "web", "--host", "h1", "--ip", IP, token=None)
    assert r.exit_code == 1 and "authorization" in r.stderr and "PORTMESH_TOKEN" in r.stderr
    r = invoke("ps", token=None)
    assert r.exit_code == 1 and "authorization" in r.stderr, "reads need the token too"
    assert invoke("ps").exit_code == 0


def test_wait_timeout_is_an_error(invoke: Any, server: Server) -> None:
    server.store.auto_converge = False
    setup_host(server)
    r = invoke("run", "web", "--host", "h1", "--ip", IP, "--timeout", "0.2")
    assert r.exit_code == 1 and "wait:" in r.stderr and "504" in r.stderr
    assert "web" in server.store.snapshot().containers  # written; just not live yet
    r = invoke("status", "-o", "json")
    assert json.loads(r.stdout)["converged"] is False
    assert "converging" in invoke("status").stdout


def test_hosts_and_status(invoke: Any, server: Server) -> None:
    setup_host(server)
    server.store.converge()
    r = invoke("hosts")
    assert r.exit_code == 0 and "h1" in r.stdout and "0000000000000001" in r.stdout
    assert json.loads(invoke("hosts", "-o", "json").stdout)[0]["status"]["switch_connected"] is True
    assert "converged" in invoke("status").stdout


@pytest.mark.parametrize(
    "args",
    [
        ["run", "web", "--host", "h1"],  # no --ip
        ["run", "web", "--host", "h1", "--ip", IP, "-p", "http"],
        ["map", "add", IP, "x/tcp", "web"],
        ["ps", "-o", "yaml"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(invoke: Any, server: Server, args: list[str]) -> None:
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert server.store.writes == 0


def test_unreachable_api_exits_1() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = CliRunner().invoke(cli.app, ["--api", f"http://127.0.0.1:{port}", "ps"])
    assert r.exit_code == 1 and "cannot reach the API" in r.stderr


@pytest.mark.parametrize(
    ("args", "forwarded"),
    [
        (["lab", "up", "--hosts", "2"], ["up", "--hosts", "2"]),
        (["lab", "--help"], ["--help"]),
        (["up", "--hosts", "2"], ["up", "--hosts", "2"]),
        (["down", "--name", "x"], ["down", "--name", "x"]),
        (["demo"], ["demo"]),
        (["demo", "--fast"], ["demo", "--fast"]),
        (
            ["lab", "exec", "inet", "--", "redis-benchmark", "-h", IP, "-n", "20000"],
            ["exec", "inet", "--", "redis-benchmark", "-h", IP, "-n", "20000"],
        ),
        (["lab", "exec", "inet", "--", "tcpdump", "-ni", "eth0"], ["exec", "inet", "--", "tcpdump", "-ni", "eth0"]),
        (["lab", "exec", "inet", "--", "ping", "-n", "-c", "1", IP], ["exec", "inet", "--", "ping", "-n", "-c", "1", IP]),
        (["lab", "exec", "inet", "--", "ls", "--help"], ["exec", "inet", "--", "ls", "--help"]),
        (["lab", "exec", "inet", "--", "echo", "--name=ux", "hi"], ["exec", "inet", "--", "echo", "--name=ux", "hi"]),
        (
            ["lab", "exec", "--name", "ux", "inet", "--", "sh", "-c", "a -- b"],
            ["exec", "--name", "ux", "inet", "--", "sh", "-c", "a -- b"],
        ),
        (["--api", "http://x", "lab", "status", "--", "--"], ["status", "--", "--"]),
    ],
)
def test_lab_pass_through(monkeypatch: pytest.MonkeyPatch, args: list[str], forwarded: list[str]) -> None:
    calls: list[list[str]] = []

    def fake_execv(path: str, argv: list[str]) -> None:
        calls.append(argv)

    monkeypatch.setattr("portmesh.cli.app.os.execv", fake_execv)
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    assert calls == [[sys.executable, "-m", "portmesh.lab", *forwarded]]


def test_cli_does_not_import_lab_or_api() -> None:
    import ast
    from pathlib import Path

    for path in Path(cli.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("portmesh.lab", "portmesh.api", "portmesh.store")), path


def test_logs_reads_the_log_file_the_agent_reported(invoke: Any, server: Server) -> None:
    from portmesh.model.entities import ContainerStatus, RunState

    setup_host(server)
    assert invoke("run", "web", "--host", "h1", "--ip", IP).exit_code == 0
    r = invoke("logs", "web")
    assert r.exit_code == 1 and "logs" in r.stderr, "no log reported yet: 404 naming the field"
    log = Path(LOG_DIR) / f"web-{os.getpid()}.log"
    log.write_text("one\ntwo\nthree\n")
    server.store.report_container_status("web", ContainerStatus(RunState.RUNNING, "ns", 1, "", str(log)))
    r = invoke("logs", "web")
    assert r.exit_code == 0 and r.stdout == "one\ntwo\nthree\n"
    assert invoke("logs", "web", "--tail", "2").stdout == "two\nthree\n"
    assert invoke("logs", "nope").exit_code == 1
    import httpx

    auth = {"Authorization": f"Bearer {TOKEN}"}
    first = httpx.get(f"{server.url}/v1/containers/web/logs", params={"tail": 1}, headers=auth).json()
    with log.open("a") as f:
        f.write("four\n")
    more = httpx.get(f"{server.url}/v1/containers/web/logs", params={"offset": first["offset"]}, headers=auth).json()
    assert more["text"] == "four\n" and more["offset"] == log.stat().st_size


@pytest.mark.parametrize(
    "command",
    [
        ["redis-benchmark", "-h", "203.0.113.10", "-n", "20000"],
        ["tcpdump", "-ni", "eth0"],
        ["ping", "-n", "-c", "1", IP],
        ["ls", "--help"],
        ["echo", "--name=ux", "hi"],
        ["sh", "-c", "a -- b", "--", "--host", "x"],
        ["-p", "80/tcp", "--ip", IP],
    ],
)
def test_run_passes_the_command_after_dashes_verbatim(invoke: Any, server: Server, command: list[str]) -> None:
    setup_host(server)
    r = invoke("run", "web", "--host", "h1", "--ip", IP, "--", *command)
    assert r.exit_code == 0, r.output
    assert list(server.store.snapshot().containers["web"].command) == command
    assert len(server.store.snapshot().mappings) == 0, "options after -- are the command's, not run's"


def test_run_takes_dockers_env_restart_and_stop_timeout(invoke: Any, server: Server) -> None:
    setup_host(server)
    r = invoke(
        "run", "web", "--host", "h1", "--ip", IP, "-e", "A=1", "--env", "B=two words",
        "--restart", "on-failure", "--stop-timeout", "3", "--", "sleep", "9",
    )
    assert r.exit_code == 0, r.output
    c = server.store.snapshot().containers["web"]
    assert list(c.env) == ["A=1", "B=two words"]
    assert c.restart.value == "on-failure"
    assert c.stop_timeout == 3
    assert list(c.command) == ["sleep", "9"], "-e/--restart values are run's, not the command's"

    r = invoke("run", "bad", "--host", "h1", "--ip", IP, "--restart", "sometimes")
    assert r.exit_code == 2 and "--restart" in r.output
    assert "bad" not in server.store.snapshot().containers


def test_stop_time_reaches_the_api_and_rm_force_is_accepted(invoke: Any, server: Server) -> None:
    setup_host(server)
    assert invoke("run", "web", "--host", "h1", "--ip", IP, "--", "sleep", "9").exit_code == 0
    r = invoke("stop", "web", "--time", "2")
    assert r.exit_code == 0, r.output
    assert not server.store.container_running("web")
    assert server.store.snapshot().containers["web"].stop_timeout == 2
    assert invoke("stop", "web", "-t", "-1").exit_code == 2
    r = invoke("rm", "-f", "web")
    assert r.exit_code == 0, r.output
    assert server.store.snapshot().containers == {}
