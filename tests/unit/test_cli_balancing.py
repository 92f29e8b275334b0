"""Issue 15 from the command line, over real HTTP (fake store): ``map add`` with several backends,
weights, policy and health check; ``map backend add|rm``; ``map policy``; ``map inspect``; ``map ls``.
Usage errors name the option (exit 2, nothing sent); the API's refusals name the field (exit 1)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from ipaddress import IPv4Address
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from portmesh.cli import app as cli
from portmesh.model.entities import HealthKind, Host, MappingCounters, MappingKey, Proto
from tests.unit.fakes import FakeStore
from tests.unit.test_cli import IP, TOKEN, Server

KEY = MappingKey(IPv4Address(IP), Proto.TCP, 80)


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


@pytest.fixture
def lb(invoke: Any, server: Server) -> Server:
    """h1 with web-a..web-d holding IP, and 'other' holding another IP."""
    for name in ("web-a", "web-b", "web-c", "web-d"):
        assert invoke("run", name, "--host", "h1", "--ip", IP).exit_code == 0
    assert invoke("run", "other", "--host", "h1", "--ip", "203.0.113.99").exit_code == 0
    return server


def test_map_add_balanced_with_policy_and_health(invoke: Any, lb: Server) -> None:
    r = invoke(
        "map", "add", IP, "80/tcp", "web-a", "web-b", "web-c", "--weight", "web-c=2",
        "--allow", "198.51.100.0/25", "--deny", "198.51.100.7/32",
        "--health", "http:/healthz=204", "--health-interval", "1", "--health-timeout", "0.5", "--health-threshold", "3",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert f"{IP}:80/tcp -> web-a web-b web-c*2" in r.stdout
    m = lb.store.snapshot().mappings[KEY]
    assert [(b.container, b.weight) for b in m.backends] == [("web-a", 1), ("web-b", 1), ("web-c", 2)]
    assert [str(n) for n in m.allow] == ["198.51.100.0/25"] and [str(n) for n in m.deny] == ["198.51.100.7/32"]
    assert m.health is not None
    assert (m.health.kind, m.health.path, m.health.expect, m.health.interval, m.health.threshold) == (
        HealthKind.HTTP, "/healthz", 204, 1.0, 3
    )  # fmt: skip


def test_map_ls_and_inspect_show_backends_health_policy_counters(invoke: Any, lb: Server) -> None:
    assert invoke("map", "add", IP, "80/tcp", "web-a", "web-b", "web-c", "--weight", "web-c=2", "--health", "tcp").exit_code == 0
    assert invoke("map", "policy", IP, "80/tcp", "--deny", "198.51.100.7/32").exit_code == 0
    lb.store.health[KEY] = {"web-a": "up", "web-b": "down: connection refused"}
    lb.store.counters[KEY] = MappingCounters(12, 1200, 4, 240)
    r = invoke("map", "ls")
    assert r.exit_code == 0, r.output
    assert "web-a(up) web-b(down) web-c*2" in r.stdout and "deny 198.51.100.7/32" in r.stdout
    r = invoke("map", "inspect", IP, "80/tcp")
    assert r.exit_code == 0, r.output
    for text in ("down: connection refused", "tcp connect, every 2s", "12 packets, 1200 bytes", "4 packets, 240 bytes"):
        assert text in r.stdout, r.stdout
    m = json.loads(invoke("map", "inspect", f"{IP}:80/tcp", "-o", "json").stdout)
    assert m["counters"]["denied_packets"] == 4
    assert [(b["container"], b["weight"], b["health"]) for b in m["backends"]] == [
        ("web-a", 1, "up"),
        ("web-b", 1, "down: connection refused"),
        ("web-c", 2, "unchecked"),
    ]


def test_backend_add_rm(invoke: Any, lb: Server) -> None:
    assert invoke("map", "add", IP, "80/tcp", "web-a").exit_code == 0
    r = invoke("map", "backend", "add", IP, "80/tcp", "web-d", "--weight", "3")
    assert r.exit_code == 0, r.output
    assert "-> web-a web-d*3" in r.stdout
    assert lb.store.snapshot().mappings[KEY].names == ("web-a", "web-d")
    r = invoke("map", "backend", "rm", f"{IP}:80/tcp", "web-a", "-o", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["mapping"]["container"] == "web-d"
    r = invoke("map", "backend", "rm", IP, "80/tcp", "web-d")
    assert r.exit_code == 1 and "container:" in r.stderr and "last backend" in r.stderr
    assert lb.store.snapshot().mappings[KEY].names == ("web-d",)


def test_policy_set_and_clear(invoke: Any, lb: Server) -> None:
    assert invoke("map", "add", IP, "80/tcp", "web-a", "--deny", "198.51.100.7/32").exit_code == 0
    r = invoke("map", "policy", IP, "80/tcp", "--allow", "198.51.100.0/25", "--allow", "203.0.113.0/24")
    assert r.exit_code == 0, r.output
    m = lb.store.snapshot().mappings[KEY]
    assert [str(n) for n in m.allow] == ["198.51.100.0/25", "203.0.113.0/24"] and len(m.deny) == 1
    assert invoke("map", "policy", IP, "80/tcp", "--clear").exit_code == 0
    m = lb.store.snapshot().mappings[KEY]
    assert m.allow == () and m.deny == ()
    r = invoke("map", "policy", IP, "80/tcp", "--clear", "--deny", "198.51.100.0/24")
    assert r.exit_code == 0 and "deny 198.51.100.0/24" in r.stdout
    assert [str(n) for n in lb.store.snapshot().mappings[KEY].deny] == ["198.51.100.0/24"]


def test_health_set_and_remove_and_weight(invoke: Any, lb: Server) -> None:
    assert invoke("map", "add", IP, "80/tcp", "web-a", "web-b").exit_code == 0
    r = invoke("map", "health", IP, "80/tcp", "--health", "http:/ok", "--health-threshold", "3")
    assert r.exit_code == 0, r.output
    assert "http GET /ok expect 200" in r.stdout
    m = lb.store.snapshot().mappings[KEY]
    assert m.health is not None and (m.health.kind, m.health.path, m.health.threshold) == (HealthKind.HTTP, "/ok", 3)
    assert invoke("map", "health", f"{IP}:80/tcp", "--none").exit_code == 0
    assert lb.store.snapshot().mappings[KEY].health is None
    r = invoke("map", "backend", "weight", IP, "80/tcp", "web-b", "5")
    assert r.exit_code == 0, r.output
    assert "-> web-a web-b*5" in r.stdout
    assert [b.weight for b in lb.store.snapshot().mappings[KEY].backends] == [1, 5]


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["map", "add", IP, "80/tcp", "web-a", "--allow", "198.51.100.1/24"], "'--allow'"),
        (["map", "add", IP, "80/tcp", "web-a", "--deny", "nope"], "'--deny'"),
        (["map", "add", IP, "80/tcp", "web-a", "web-b", "--weight", "web-c=2"], "'--weight'"),
        (["map", "add", IP, "80/tcp", "web-a", "--weight", "web-a=0"], "'--weight'"),
        (["map", "add", IP, "80/tcp", "web-a", "--weight", "web-a"], "'--weight'"),
        (["map", "add", IP, "80/tcp", "web-a", "--weight", "web-a=999"], "'--weight'"),
        (["map", "add", IP, "80/tcp", "web-a", "--health", "udp"], "'--health'"),
        (["map", "add", IP, "80/tcp", "web-a", "--health", "tcp:/x"], "'--health'"),
        (["map", "add", IP, "80/tcp", "web-a", "--health", "http:nopath"], "'--health'"),
        (["map", "add", IP, "80/tcp", "web-a", "--health", "http:/=999"], "'--health'"),
        (["map", "add", IP, "80/tcp", "web-a", "--health-interval", "2"], "'--health-interval'"),
        (["map", "add", IP, "80/tcp", "web-a", "--health", "tcp", "--health-interval", "0"], "'--health-interval'"),
        (["map", "add", IP, "80/tcp", "web-a", "--health", "tcp", "--health-timeout", "9"], "'--health-timeout'"),
        (["map", "add", IP, "80/tcp", "web-a", "--health", "tcp", "--health-threshold", "0"], "'--health-threshold'"),
        (["map", "add", IP, "80/tcp", "web-a", "--health", "tcp", "--health-port", "70000"], "'--health-port'"),
        (["map", "add", IP, "80/tcp", "web-a", "Bad"], "'NAME'"),
        (["map", "policy", IP, "80/tcp"], "'--clear'"),
        (["map", "policy", IP, "80/tcp", "--allow", "x"], "'--allow'"),
        (["map", "backend", "add", IP, "80/tcp"], "'NAME'"),
        (["map", "backend", "add", IP, "80/tcp", "web-b", "web-c"], "'NAME'"),
        (["map", "backend", "add", IP, "80/tcp", "web-b", "--weight", "0"], "'--weight'"),
        (["map", "backend", "rm", IP, "80/tcp", ".."], "'NAME'"),
        (["map", "backend", "rm", "80/tcp", "web-b"], "'IP:PORT/PROTO'"),
        (["map", "inspect", IP, "80/xdp"], "'PORT/PROTO'"),
        (["map", "health", IP, "80/tcp"], "'--none'"),
        (["map", "health", IP, "80/tcp", "--health", "tcp", "--none"], "'--none'"),
        (["map", "health", IP, "80/tcp", "--health", "http:/x=600"], "'--health'"),
        (["map", "health", IP, "80/tcp", "--none", "--health-timeout", "1"], "'--health-timeout'"),
        (["map", "backend", "weight", IP, "80/tcp", "web-a"], "'NAME N'"),
        (["map", "backend", "weight", IP, "80/tcp", "web-a", "0"], "'N'"),
        (["map", "backend", "weight", IP, "80/tcp", "web-a", "x"], "'N'"),
    ],
)
def test_usage_errors_name_the_option(invoke: Any, lb: Server, args: list[str], option: str) -> None:
    writes = lb.store.writes
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert option in r.stderr, r.stderr
    assert lb.store.writes == writes, "nothing changed"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["map", "add", IP, "80/tcp", "web-a", "ghost"], "backends[1]:"),
        (["map", "add", IP, "80/tcp", "web-a", "other"], "backends[1]:"),
        (["map", "add", IP, "81/tcp", "web-a"], "port:"),  # already mapped
        (["map", "backend", "add", IP, "80/tcp", "web-a"], "container:"),  # already a backend
        (["map", "backend", "add", IP, "80/tcp", "ghost"], "container:"),
        (["map", "backend", "add", IP, "80/tcp", "other"], "public_ip:"),
        (["map", "backend", "add", IP, "82/tcp", "web-b"], "mapping:"),
        (["map", "backend", "rm", IP, "80/tcp", "web-c"], "container:"),  # not a backend
        (["map", "policy", IP, "82/tcp", "--clear"], "mapping:"),
        (["map", "inspect", IP, "82/tcp"], "mapping:"),
        (["map", "health", IP, "82/tcp", "--none"], "mapping:"),
        (["map", "backend", "weight", IP, "80/tcp", "web-c", "2"], "weights.web-c:"),  # not a backend
    ],
)
def test_api_refusals_exit_1_naming_the_field(invoke: Any, lb: Server, args: list[str], field: str) -> None:
    assert invoke("map", "add", IP, "80/tcp", "web-a", "web-b").exit_code == 0
    assert invoke("map", "add", IP, "81/tcp", "web-b").exit_code == 0
    before, writes = lb.store.snapshot().mappings, lb.store.writes
    r = invoke(*args)
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith(f"error: {field}"), r.stderr
    assert lb.store.writes == writes and lb.store.snapshot().mappings == before
