"""``portmesh host add|rm``, ``hosts``, ``pool ls|add|rm``, ``config show|set`` over real HTTP (fake store)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.unit.test_cli import IP, Server, invoke, server, store  # noqa: F401 (fixtures)


def three_hosts(invoke: Any) -> None:  # noqa: F811
    for n in (1, 2, 3):
        r = invoke("host", "add", f"h{n}", "--underlay-ip", f"198.19.0.{10 + n}")
        assert r.exit_code == 0, r.output


def test_host_add_rm_and_hosts_table(invoke: Any, server: Server) -> None:  # noqa: F811
    three_hosts(invoke)
    r = invoke("host", "add", "h4", "--underlay-ip", "198.19.0.14", "--role", "gateway", "--datapath-id", "40")
    assert r.exit_code == 0 and "host h4 added as gateway" in r.stdout and "live everywhere" in r.stdout, r.output
    assert server.store.snapshot().hosts["h4"].datapath_id == 40
    server.store.report_tunnels("h1", {"h2": "up", "h3": "down: no route", "h4": "up"})
    r = invoke("run", "web", "--host", "h2", "--ip", IP)
    assert r.exit_code == 0, r.output
    r = invoke("hosts")
    assert r.exit_code == 0, r.output
    lines = {line.split()[0]: line for line in r.stdout.splitlines()}
    assert "ROLE" in lines["NAME"] and "TUNNELS" in lines["NAME"] and "CONTAINERS" in lines["NAME"]
    assert "gateway" in lines["h1"] and "198.19.0.11" in lines["h1"] and "2/3 up; down: h3 (no route)" in lines["h1"]
    assert "compute" in lines["h2"] and lines["h2"].split()[6] == "1"  # CONTAINERS
    listed = json.loads(invoke("hosts", "-o", "json").stdout)
    assert [h["role"] for h in listed] == ["gateway", "compute", "compute", "gateway"]
    r = invoke("host", "rm", "h2")
    assert r.exit_code == 1 and "error: name:" in r.stderr and "'web'" in r.stderr
    assert invoke("host", "rm", "h4").exit_code == 0
    assert "h4" not in server.store.snapshot().hosts


def test_write_names_the_hosts_that_lag(invoke: Any, server: Server) -> None:  # noqa: F811
    three_hosts(invoke)
    server.store.down.add("h3")
    server.store.report_switch("h3", 0, False)
    r = invoke("run", "web", "--host", "h2", "--ip", IP, "--timeout", "5")
    assert r.exit_code == 0, r.output
    assert "live on every host that is up" in r.stdout and "h3 lags: switch disconnected" in r.stdout
    r = invoke("run", "api", "--host", "h3", "--ip", IP, "--timeout", "0.5")
    assert r.exit_code == 1 and "h3 (switch disconnected)" in r.stderr, r.output


def test_pools(invoke: Any, server: Server) -> None:  # noqa: F811
    three_hosts(invoke)
    r = invoke("pool", "add", "198.51.100.0/24")
    assert r.exit_code == 0 and "pool 198.51.100.0/24 added" in r.stdout, r.output
    r = invoke("pool", "ls")
    assert "198.51.100.0/24" in r.stdout and "203.0.113.0/24" in r.stdout
    assert {p["pool"] for p in json.loads(invoke("pool", "ls", "-o", "json").stdout)} == {"198.51.100.0/24", "203.0.113.0/24"}
    assert invoke("run", "web", "--host", "h2", "--ip", "198.51.100.9").exit_code == 0
    r = invoke("pool", "rm", "198.51.100.0/24")
    assert r.exit_code == 1 and "error: pool:" in r.stderr and "'web'" in r.stderr
    r = invoke("pool", "add", "203.0.113.0/25")
    assert r.exit_code == 1 and "overlaps" in r.stderr
    assert invoke("rm", "web").exit_code == 0
    assert invoke("pool", "rm", "198.51.100.0/24").exit_code == 0
    assert [str(p) for p in server.store.snapshot().config.public_pools] == ["203.0.113.0/24"]


def test_config(invoke: Any, server: Server) -> None:  # noqa: F811
    r = invoke("config", "show")
    assert r.exit_code == 0 and "vxlan_port" in r.stdout and "203.0.113.0/24" in r.stdout, r.output
    assert json.loads(invoke("config", "show", "-o", "json").stdout)["container_mtu"] == 1450
    r = invoke("config", "set", "container-mtu", "1400")
    assert r.exit_code == 0 and "container_mtu = 1400" in r.stdout, r.output
    assert invoke("config", "set", "protected_networks", "198.18.0.0/16,198.19.0.0/16").exit_code == 0
    assert [str(n) for n in server.store.snapshot().config.protected_networks] == ["198.18.0.0/16", "198.19.0.0/16"]
    r = invoke("config", "set", "gateway_ip", "10.1.1.1")
    assert r.exit_code == 1 and "error: gateway_ip:" in r.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("config", "set", "mtu", "1400"),
        ("config", "set", "public_pools", "198.51.100.0/24"),
        ("config", "set", "block_size", "x"),
        ("config", "set", "vxlan_port", "70000"),
        ("config", "set", "gateway_ip", "nope"),
        ("config", "set", "protected_networks", "198.18.0.1/15"),
        ("pool", "add", "198.51.100.1/24"),
        ("pool", "add", "nope"),
        ("pool", "rm", "198.51.100.0"),
        ("host", "add", "Bad_Name", "--underlay-ip", "198.19.0.20"),
        ("host", "add", "h9", "--underlay-ip", "999.1.1.1"),
        ("host", "add", "h9", "--underlay-ip", "198.19.0.20", "--role", "router"),
        ("host", "add", "h9"),
        ("host", "rm", ".."),
    ],
)
def test_usage_errors_exit_2(invoke: Any, server: Server, args: tuple[str, ...]) -> None:  # noqa: F811
    before = server.store.snapshot()
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert server.store.snapshot() == before
