"""What the CLI prints is machine text, printed literally (issue 10, item 4), and Docker's habits (ps -a/-q, inspect A B).

Runs the CLI against the real API (fake store) over HTTP, as test_cli does; CliRunner's stdout
is not a terminal, so these also show what a pipe gets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from portmesh.cli import app as cli
from portmesh.cli import render
from portmesh.model.entities import Host
from tests.unit.fakes import FakeStore
from tests.unit.test_cli import IP, TOKEN, Server

# A command full of what markup and shells care about: brackets, quotes, a rich closing tag, an emoji code.
TRICKY = ["sh", "-c", "echo '[/]' \"$X\" [bold]x[/bold] :ab: done", "--name=ux", ""]


@pytest.fixture
def server() -> Iterator[Server]:
    with Server(FakeStore(auto_converge=True)) as s:
        s.store.add_host(Host("h1", 1))
        yield s


@pytest.fixture
def invoke(server: Server) -> Any:
    def run(*args: str) -> Result:
        env = {"PORTMESH_API": server.url, "PORTMESH_TOKEN": TOKEN, "PORTMESH_TOKEN_FILE": "/nonexistent"}
        return CliRunner().invoke(cli.app, list(args), env=env)

    return run


def test_mac_is_printed_literally_never_as_an_emoji(invoke: Any, server: Server) -> None:
    assert invoke("run", "web", "--host", "h1", "--ip", IP).exit_code == 0
    mac = server.store.snapshot().containers["web"].mac
    r = invoke("inspect", "web")
    assert r.exit_code == 0 and mac in r.stdout, r.stdout
    # Positive control for the failure the issue saw: rich with emoji codes on turns ':ab:' into a symbol.
    from rich.console import Console

    plain, emoji = Console(emoji=False, markup=False, record=True), Console(record=True)
    plain.print("02:9a:1d:ab:b5:cc")
    emoji.print("02:9a:1d:ab:b5:cc")
    assert "02:9a:1d:ab:b5:cc" in plain.export_text() and "02:9a:1d:ab:b5:cc" not in emoji.export_text()
    # And through the CLI's own renderer, with a MAC that has the code in it.
    item = json.loads(invoke("inspect", "web", "-o", "json").stdout)
    item["mac"] = "02:9a:1d:ab:b5:cc"
    console = cli.out()
    with console.capture() as cap:
        render.container(console, item)
    assert "02:9a:1d:ab:b5:cc" in cap.get()


def test_command_keeps_its_brackets_and_quoting(invoke: Any, server: Server) -> None:
    r = invoke("run", "odd", "--host", "h1", "--ip", IP, "--", *TRICKY)
    assert r.exit_code == 0, r.output
    assert server.store.snapshot().containers["odd"].command == tuple(TRICKY), "reached the API exactly as typed"
    r = invoke("inspect", "odd")
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("command"))
    import shlex

    assert shlex.split(line.removeprefix("command").strip()) == TRICKY, line


def test_piped_tables_do_not_wrap(invoke: Any, server: Server) -> None:
    ips = [f"203.0.113.{i}" for i in range(10, 20)]
    args = ["run", "wide-container-name-of-some-length", "--host", "h1"]
    for ip in ips:
        args += ["--ip", ip]
    for port in ("80/tcp", "443/tcp", "8080/tcp", "53/udp"):
        args += ["-p", port]
    assert invoke(*args).exit_code == 0
    r = invoke("ps")
    lines = r.stdout.splitlines()
    assert len(lines) == 2, r.stdout  # header + one row, however long
    assert max(len(ln) for ln in lines) > 80, "the positive control: the row is longer than a terminal"
    assert all(ip in lines[1] for ip in ips)
    assert all(ln == ln.rstrip() for ln in lines), "no padding after the last column"


def test_status_line_is_plain_text(invoke: Any, server: Server) -> None:
    server.store.converge()
    r = invoke("status")
    assert r.exit_code == 0 and r.stdout.splitlines()[0].endswith("converged") and "[" not in r.stdout


def test_ps_all_and_quiet(invoke: Any, server: Server) -> None:
    assert invoke("run", "up1", "--host", "h1", "--ip", IP).exit_code == 0
    assert invoke("run", "down1", "--host", "h1", "--ip", IP).exit_code == 0
    assert invoke("stop", "down1").exit_code == 0
    assert invoke("ps", "-q").stdout.split() == ["up1"]
    assert sorted(invoke("ps", "-a", "-q").stdout.split()) == ["down1", "up1"]
    assert "down1" not in invoke("ps").stdout and "down1" in invoke("ps", "-a").stdout
    assert [c["name"] for c in json.loads(invoke("ps", "-a", "-o", "json").stdout)] == ["down1", "up1"]


def test_inspect_several_names(invoke: Any) -> None:
    for name in ("a1", "b1"):
        assert invoke("run", name, "--host", "h1", "--ip", IP).exit_code == 0
    body = json.loads(invoke("inspect", "a1", "b1", "-o", "json").stdout)
    assert [c["name"] for c in body] == ["a1", "b1"]
    assert json.loads(invoke("inspect", "a1", "-o", "json").stdout)["name"] == "a1", "one name: one object"
    r = invoke("inspect", "a1", "ghost", "b1")
    assert r.exit_code == 1 and "ghost" in r.stderr
    assert "a1" in r.stdout and "b1" in r.stdout, "what exists is still shown, as docker inspect does"


def test_publish_ip_port_and_map_ip_port(invoke: Any, server: Server) -> None:
    r = invoke("run", "web", "--host", "h1", "-p", f"{IP}:80/tcp", "-p", f"{IP}:53/udp")
    assert r.exit_code == 0, r.output
    st = server.store.snapshot()
    assert [str(ip) for ip in st.containers["web"].ips] == [IP]
    assert sorted((m.port, m.proto.value) for m in st.mappings.values()) == [(53, "udp"), (80, "tcp")]
    r = invoke("map", "add", f"{IP}:8080/tcp", "web")
    assert r.exit_code == 0 and f"{IP}:8080/tcp -> web" in r.stdout, r.output
    r = invoke("map", "add", IP, "8081/tcp", "web")
    assert r.exit_code == 0, r.output
    assert invoke("map", "rm", f"{IP}:8080/tcp").exit_code == 0
    assert invoke("map", "rm", IP, "8081").exit_code == 0
    assert len(server.store.snapshot().mappings) == 2


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["run", "w", "--host", "h1", "--ip", "203.0.113.11", "-p", f"{IP}:80/tcp"], "'--port' / '-p'"),
        (["run", "w", "--host", "h1", "-p", "80/tcp"], "'--ip'"),
        (["run", "w", "--host", "h1", "-p", "1.2.3:80/tcp"], "'--port' / '-p'"),
        (["run", "w", "--host", "h1", "--ip", "nope"], "'--ip'"),
        (["map", "add", "80/tcp", "web"], "'IP:PORT/PROTO'"),
        (["map", "add", IP, "80/tcp", "web", "web"], "'NAME'"),  # a backend named twice
        (["map", "add", IP, "80/tcp"], "'NAME'"),
        (["map", "add", IP, "80/xdp", "web"], "'PORT/PROTO'"),
        (["map", "rm", "nope", "80/tcp"], "'IP'"),
    ],
)
def test_usage_errors_name_the_option(invoke: Any, server: Server, args: list[str], names: str) -> None:
    writes = server.store.writes
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert names in r.stderr, r.stderr
    assert server.store.writes == writes, "nothing changed"


def test_ps_and_inspect_show_exit_code_and_restarts(invoke: Any, server: Server) -> None:
    from portmesh.model.entities import ContainerStatus, RunState

    assert invoke("run", "crashy", "--host", "h1", "--ip", IP).exit_code == 0
    r = invoke("ps")
    assert "exit" not in r.stdout and "restart" not in r.stdout, "positive control: nothing to say yet"
    fields = {"exit_code": 3, "restarts": 2} if "exit_code" in ContainerStatus.__dataclass_fields__ else None
    if fields is None:
        pytest.skip("the model has no exit code or restart count yet")
    status = ContainerStatus(RunState.EXITED, "", None, "process exited", "", **fields)  # type: ignore[arg-type]
    server.store.report_container_status("crashy", status)
    assert "exited (exit 3, 2 restarts) (want up)" in invoke("ps").stdout
    r = invoke("inspect", "crashy")
    assert "exit code  3" in r.stdout and "(2 so far)" in r.stdout, r.stdout


def test_logs_follow_returns_once_the_container_has_exited(invoke: Any, server: Server) -> None:
    import subprocess
    import sys
    from pathlib import Path

    from portmesh.model.entities import ContainerStatus, RunState
    from tests.unit.test_cli import LOG_DIR

    assert invoke("run", "brief", "--host", "h1", "--ip", IP).exit_code == 0
    log = Path(LOG_DIR) / f"brief-{os.getpid()}.log"
    log.write_text("said\n")
    env = {**os.environ, "PORTMESH_API": server.url, "PORTMESH_TOKEN": TOKEN}
    portmesh = str(Path(sys.executable).parent / "portmesh")
    server.store.report_container_status("brief", ContainerStatus(RunState.RUNNING, "ns", 1, "", str(log)))
    # Positive control: while it runs, -f keeps following (still going after 1.5 s).
    follower = subprocess.Popen([portmesh, "logs", "-f", "brief"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            follower.wait(timeout=1.5)
        server.store.report_container_status("brief", ContainerStatus(RunState.EXITED, "ns", None, "exited", str(log)))
        assert follower.wait(timeout=20) == 0, "-f returned once the container had exited"
        assert follower.stdout is not None and follower.stdout.read() == "said\n"
    finally:
        follower.kill()
        follower.wait()
