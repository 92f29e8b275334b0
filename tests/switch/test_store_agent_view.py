"""Issue 12 item 9 on a real ovsdb-server: an agent's view of the store (``Store(remote, host=NAME)``)
holds only its own host's containers (conditional monitoring: the server never sends the others), all
hosts and the config, only desired Host columns; and it can still write every report the agent makes."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from portmesh.model.entities import Container, ContainerStatus, Host, HostRole, RunState, mac_for
from portmesh.store.client import Store
from portmesh.store.server import start_server, stop_server
from tests.switch.test_store import container, mapping, server
from tests.switch.test_store_mirror import wait_until

__all__ = ["server"]  # the fixture, re-used


def hosts() -> list[Host]:
    return [
        Host("h1", 1, IPv4Address("198.19.0.11"), HostRole.GATEWAY),
        Host("h2", 2, IPv4Address("198.19.0.12"), HostRole.COMPUTE),
        Host("h3", 3, IPv4Address("198.19.0.13"), HostRole.COMPUTE),
    ]


@pytest.fixture
def api(server: str) -> Iterator[Store]:
    with Store(server, timeout=5) as s:
        for h in hosts():
            s.add_host(h)
        s.add_container(container("c2", "h2", block=32768), [mapping(80, "c2")])
        s.add_container(container("c3", "h3", block=33792), [mapping(443, "c3")])
        yield s


class Seen:
    """Every Container row notice the agent's store applied: which hosts' rows ever reached it."""

    def __init__(self, store: Store) -> None:
        self.hosts: list[str] = []
        self.wakeups = 0
        original = store._mirror.apply

        def apply(event: str, table: str, row: Any) -> None:
            if table == "Container":
                self.hosts.append(str(row._data["host"].to_python(lambda v, _b: v)) if row._data else "?")
            original(event, table, row)

        store._mirror.apply = apply  # type: ignore[method-assign]
        original_rebuild = store._mirror.rebuild

        def rebuild(tables: Any) -> None:
            self.hosts.extend(str(r.host) for r in tables.get("Container", ()) if r._data is not None)
            original_rebuild(tables)

        store._mirror.rebuild = rebuild  # type: ignore[method-assign]
        store.subscribe(self.wake)

    def wake(self) -> None:
        self.wakeups += 1


def test_agent_view_holds_only_its_hosts_containers_and_a_moved_one_appears(api: Store, server: str) -> None:
    agent = Store(server, timeout=5, host="h2")
    seen = Seen(agent)
    with agent:
        state = agent.snapshot()
        assert set(state.hosts) == {"h1", "h2", "h3"}  # all hosts: the agent needs its peers' underlay IPs
        assert state.hosts["h3"] == hosts()[2]
        assert set(state.containers) == {"c2"}  # positive control: its own container is there
        assert state.mappings == {}
        assert state.config == api.snapshot().config
        assert state.generation == api.snapshot().generation  # Global is whole
        # Another host's new container: the agent's generation moves on, the row never arrives.
        generation = api.add_container(container("c3b", "h3", block=34816))
        wait_until(lambda: agent.snapshot().generation == generation)
        assert set(agent.snapshot().containers) == {"c2"}
        # A container moved from h3 to h2 (remove + add): it appears, and goes again when moved back.
        c3 = api.snapshot().containers["c3"]
        api.remove_container("c3")
        generation = api.add_container(Container(**{**c3.__dict__, "host": "h2"}))
        wait_until(lambda: agent.snapshot().generation == generation)
        assert agent.snapshot().containers["c3"].host == "h2"
        api.remove_container("c3")
        generation = api.add_container(c3)
        wait_until(lambda: agent.snapshot().generation == generation)
        assert set(agent.snapshot().containers) == {"c2"}
        assert seen.hosts and set(seen.hosts) == {"h2"}, f"the agent saw other hosts' containers: {seen.hosts}"


def test_agent_view_writes_its_reports_and_is_not_woken_by_others(api: Store, server: str) -> None:
    agent = Store(server, timeout=5, host="h2")
    seen = Seen(agent)
    with agent:
        generation = api.snapshot().generation
        wait_until(lambda: seen.wakeups > 0)  # the initial load
        status = ContainerStatus(RunState.RUNNING, netns="pm-c2", pid=42)
        agent.report_container_status("c2", status)
        agent.report_agent("h2", generation)
        agent.report_tunnels("h2", {"h1": "up", "h3": "down: no reply"})
        wait_until(lambda: api.host_status("h2").agent_generation == generation)
        wait_until(lambda: api.host_status("h2").tunnels == (("h1", "up"), ("h3", "down: no reply")))
        wait_until(lambda: api.container_status("c2") == status)
        assert agent.container_status("c2") == status  # its own container's status columns are replicated
        assert agent.container_running("c2") is True
        assert api.snapshot().generation == generation  # reports: no bump
        # Other hosts' and the controller's reports concern columns the agent does not monitor.
        time.sleep(0.2)
        before = seen.wakeups
        for g in range(3):
            api.report_switch("h2", g, True)
            api.report_switch("h3", g, True)
            api.report_agent("h3", g)
            api.report_tunnels("h3", {"h1": f"down: {g}"})
        time.sleep(0.3)
        assert seen.wakeups == before, "status reports of others woke the agent"
        api.add_host(Host("h4", 4, IPv4Address("198.19.0.14"), HostRole.COMPUTE))  # positive control
        wait_until(lambda: seen.wakeups > before)
        assert "h4" in agent.snapshot().hosts
        # A report repeated after the agent restarts (a new client) is written again only if it differs.
        agent.report_tunnels("h2", {"h1": "up"})
        wait_until(lambda: api.host_status("h2").tunnels == (("h1", "up"),))


def test_agent_view_stays_filtered_across_a_server_restart(tmp_path: Path) -> None:
    """After a reconnect (a new server on the same file, rows changed while it was down) the view
    loads again with the same condition: its own host's containers only, the offline changes included."""
    db, sock = tmp_path / "store.db", tmp_path / "store.sock"
    pid = start_server(db, sock)
    try:
        with Store(f"unix:{sock}", timeout=5) as api:
            for h in hosts():
                api.add_host(h)
            api.add_container(container("c2", "h2", block=32768))
        agent = Store(f"unix:{sock}", timeout=5, host="h2")
        seen = Seen(agent)
        with agent:
            assert set(agent.snapshot().containers) == {"c2"}
            stop_server(pid)
            rows = [
                {"op": "insert", "table": "Container",
                 "row": {"name": name, "host": host, "mac": mac_for(name), "ips": "203.0.113.10",
                         "block_start": start, "block_size": 1024, "command": "[]", "running": True}}
                for name, host, start in (("c2b", "h2", 33792), ("c3", "h3", 34816))
            ]
            rows.append({"op": "mutate", "table": "Global", "where": [],
                         "mutations": [["generation", "+=", 1]]})
            subprocess.run(["ovsdb-tool", "transact", str(db), json.dumps(["Portmesh", *rows])],
                           check=True, capture_output=True)
            pid = start_server(db, sock, create=False)
            wait_until(lambda: "c2b" in agent.snapshot().containers, timeout=15)  # positive control
            assert set(agent.snapshot().containers) == {"c2", "c2b"}
            assert set(seen.hosts) == {"h2"}, f"the agent saw other hosts' containers: {seen.hosts}"
            agent.report_agent("h2", agent.snapshot().generation)  # and it still writes
    finally:
        stop_server(pid)
