"""Shell completion completes container names, asked from the API; with no API it completes nothing, silently."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from portmesh.cli import app as cli
from portmesh.model.entities import Host
from tests.unit.fakes import FakeStore
from tests.unit.test_cli import IP, TOKEN, Server

PORTMESH = str(Path(sys.executable).parent / "portmesh")


@pytest.fixture
def server() -> Iterator[Server]:
    with Server(FakeStore(auto_converge=True)) as s:
        s.store.add_host(Host("h1", 1))
        env = {"PORTMESH_API": s.url, "PORTMESH_TOKEN": TOKEN}
        for name in ("web1", "web2", "db1"):
            assert CliRunner().invoke(cli.app, ["run", name, "--host", "h1", "--ip", IP], env=env).exit_code == 0
        yield s


def complete(api: str, words: str) -> subprocess.CompletedProcess[str]:
    """What bash's completion function asks the program (typer's protocol: _PORTMESH_COMPLETE=complete_bash)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTMESH_")}
    env.update(
        {
            "_PORTMESH_COMPLETE": "complete_bash",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
            "PORTMESH_API": api,
            "PORTMESH_TOKEN": TOKEN,
        }
    )
    return subprocess.run([PORTMESH], env=env, capture_output=True, text=True, timeout=60)


def names(done: subprocess.CompletedProcess[str]) -> list[str]:
    return sorted(line for line in done.stdout.splitlines() if line.strip())


@pytest.mark.parametrize("verb", ["inspect", "logs", "stop", "start", "rm", "exec"])
def test_container_names_complete(server: Server, verb: str) -> None:
    done = complete(server.url, f"portmesh {verb} we")
    assert done.returncode == 0, done.stderr
    assert names(done) == ["web1", "web2"]
    assert names(complete(server.url, f"portmesh {verb} ")) == ["db1", "web1", "web2"]


def test_no_api_completes_nothing_silently() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = complete(f"http://127.0.0.1:{port}", "portmesh inspect we")
    assert done.returncode == 0 and names(done) == [] and done.stderr == ""
