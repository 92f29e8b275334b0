"""Liveness with a fake clock: the agents' leases (schema 1.9.0 heartbeats) beside the switch and silence rules.

An eBPF host whose agent's heartbeat stops for the lease is down (the agent programs its datapath);
an OVS host's dead agent is only reported (its switch still forwards, programmed by the controller);
a host never seen to beat gets a whole lease from the moment this API first sees it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from portmesh.agent.heartbeat import Heartbeat
from portmesh.api.app import create_app
from portmesh.api.progress import AGENT_LEASE, Liveness
from portmesh.cli.render import host_down
from portmesh.model.entities import HostStatus
from tests.unit.fakes import FakeStore
from tests.unit.test_api import AUTH, IP, TOKEN
from tests.unit.test_api_mesh import three_hosts


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def alive(datapath: str | None, beat: int = 7, generation: int = 5) -> HostStatus:
    """A host at ``generation`` (not behind), switch connected (an eBPF agent says so itself)."""
    return HostStatus(switch_generation=generation, agent_generation=generation, switch_connected=True,
                      heartbeat=beat, datapath=datapath)


def test_the_lease_defaults_to_three_beats_of_the_agents_default_interval() -> None:
    from portmesh.agent.heartbeat import DEFAULT_INTERVAL

    assert AGENT_LEASE == 3 * DEFAULT_INTERVAL


def test_an_ebpf_host_whose_heartbeat_stops_is_down_once_the_lease_runs_out() -> None:
    clock = Clock()
    live = Liveness(silence=10.0, clock=clock, lease=3.0)
    hs = alive("ebpf")
    assert live.down("h3", hs, 5) is None  # first sight starts the clock
    clock.now += 2.9
    assert live.down("h3", hs, 5) is None and live.agent_dead("h3", hs) is None  # control: within the lease
    clock.now += 0.2
    assert live.down("h3", hs, 5) == "agent lease expired (no heartbeat for 3s)"
    assert live.agent_dead("h3", hs) == "agent lease expired (no heartbeat for 3s)"
    clock.now += 5.0  # the reason tells how long
    assert live.down("h3", hs, 5) == "agent lease expired (no heartbeat for 8s)"


def test_a_beat_resets_the_lease() -> None:
    clock = Clock()
    live = Liveness(clock=clock, lease=3.0)
    live.down("h3", alive("ebpf", beat=1), 5)
    for beat in range(2, 8):  # beating every 2 s for 12 s: never down
        clock.now += 2.0
        assert live.down("h3", alive("ebpf", beat=beat), 5) is None
    clock.now += 3.5
    assert live.down("h3", alive("ebpf", beat=7), 5) is not None  # then it stops
    assert live.down("h3", alive("ebpf", beat=8), 5) is None  # and comes back: up at once


def test_beats_from_the_stores_notices_count_between_statuses() -> None:
    """The store's row notices (Store.watch_heartbeats -> Liveness.beat) time a beat when it arrives,
    not when a status next looks: a beat 2.5 s ago leaves 0.5 s of lease, whatever was last looked at."""
    clock = Clock()
    live = Liveness(clock=clock, lease=3.0)
    assert live.down("h3", alive("ebpf", beat=1), 5) is None
    clock.now += 2.0
    live.beat("h3", 2)  # arrives, nobody asks
    clock.now += 2.5
    assert live.down("h3", alive("ebpf", beat=2), 5) is None  # 2.5 s since the beat, 4.5 s since the last look
    clock.now += 0.6
    assert live.down("h3", alive("ebpf", beat=2), 5) == "agent lease expired (no heartbeat for 3s)"


def test_a_host_never_seen_to_beat_gets_a_whole_lease_from_first_sight() -> None:
    """An API started long after the agent's last beat (or a host whose agent never beat) starts the
    host's clock when it first sees it: not declared down at once."""
    clock = Clock()
    live = Liveness(clock=clock, lease=3.0)
    clock.now += 3600.0
    stale = alive("ebpf", beat=41)
    assert live.down("h3", stale, 5) is None
    assert live.agent_dead("h3", stale) is None
    clock.now += 3.1
    assert live.down("h3", stale, 5) is not None


def test_an_agent_that_never_said_its_datapath_holds_no_lease() -> None:
    """An agent from before schema 1.9.0 never beats nor says its datapath: the silence rule alone,
    as before (up while at the store's generation; silent once behind for the silence)."""
    clock = Clock()
    live = Liveness(silence=10.0, clock=clock, lease=3.0)
    old = alive(None, beat=0)
    live.down("h3", old, 5)
    clock.now += 60.0
    assert live.down("h3", old, 5) is None and live.agent_dead("h3", old) is None
    assert live.down("h3", old, 6) is None  # behind from now on
    clock.now += 10.5
    assert live.down("h3", old, 6) == "agent silent for 10s at generation 5"


def test_an_ovs_host_with_a_dead_agent_is_reported_but_not_down() -> None:
    """OVS: the controller programs the switch, which still forwards: the dead agent is said
    (agent_dead), the host is not down for it, so writes keep waiting for its switch."""
    clock = Clock()
    live = Liveness(silence=10.0, clock=clock, lease=3.0)
    hs = alive("ovs")
    live.down("h2", hs, 5)
    clock.now += 4.0
    assert live.agent_dead("h2", hs) == "agent lease expired (no heartbeat for 4s)"
    assert live.down("h2", hs, 5) is None
    # ... the existing rules still hold for it: the silence once its agent is behind ...
    assert live.down("h2", hs, 6) is None
    clock.now += 10.5
    assert live.down("h2", hs, 6) == "agent silent for 10s at generation 5"
    # ... and the switch: a disconnected switch is down whatever the lease.
    assert live.down("h2", dataclasses.replace(hs, switch_connected=False), 5) == "switch disconnected"


def test_a_host_removed_and_added_again_starts_afresh() -> None:
    clock = Clock()
    live = Liveness(clock=clock, lease=3.0)
    live.down("h3", alive("ebpf", beat=9), 5)
    clock.now += 5.0
    assert live.down("h3", alive("ebpf", beat=9), 5) is not None
    live.forget({"h1"})  # h3 is gone from the store
    assert live.down("h3", alive("ebpf", beat=9), 5) is None  # back (same beat value): a new first sight


def test_the_hosts_table_says_why() -> None:
    assert host_down({"down": "agent lease expired (no heartbeat for 4s)"}) == "agent lease expired (no heartbeat for 4s)"
    assert host_down({"down": None, "agent_dead": "agent lease expired (no heartbeat for 4s)"}) == (
        "agent dead: agent lease expired (no heartbeat for 4s)"
    )
    assert host_down({"down": None, "agent_dead": None}) == ""


class Beats:
    """A store whose heartbeat write fails ``fail`` times, then records."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.beats: list[tuple[str, int, str | None]] = []

    def report_heartbeat(self, host: str, beat: int, datapath: str | None = None) -> None:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("store away")
        self.beats.append((host, beat, datapath))


def test_the_agent_beats_a_counter_and_retries_a_failed_beat(caplog: pytest.LogCaptureFixture) -> None:
    store = Beats(fail=2)
    heart = Heartbeat("h3", store, "ebpf", interval=0.01)

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.ensure_future(heart.run(stop))
        while len(store.beats) < 3:
            await asyncio.sleep(0.005)
        stop.set()
        await asyncio.wait_for(task, 2.0)

    with caplog.at_level(logging.WARNING, logger="portmesh.agent.heartbeat"):
        asyncio.run(run())
    beats = [b for _, b, _ in store.beats]
    assert beats == sorted(set(beats)) and len(beats) >= 3  # each beat a new value
    assert all(h == "h3" and d == "ebpf" for h, _, d in store.beats)
    failures = [r for r in caplog.records if "heartbeat of host h3 failed" in r.getMessage()]
    assert len(failures) == 2 and "store away" in failures[0].getMessage()  # logged, not swallowed
    assert heart.failures == 0


def test_a_non_positive_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="interval"):
        Heartbeat("h3", Beats(), "ovs", interval=0)


# --- through the API, on the fake store: a write on h2 while h3's agent is dead ---


class BeatingStore(FakeStore):
    """Every agent that said its datapath beats 50 times a second, except on the hosts in ``down``."""

    def host_status(self, host: str) -> HostStatus:
        hs = super().host_status(host)
        if hs.datapath is None or host in self.down:
            return hs
        return dataclasses.replace(hs, heartbeat=int(time.monotonic() * 50))


def dead_agent_cloud(datapath: str, silence: float) -> tuple[FakeStore, TestClient]:
    """Three hosts, every agent saying ``datapath`` with a heartbeat; h3's agent then dies (no more
    reports, no more beats; its switch still looks connected, as an eBPF agent left it)."""
    store = BeatingStore(auto_converge=True)
    client = TestClient(create_app(store, TOKEN, wait_timeout=5.0, agent_silence=silence, agent_lease=0.3), headers=AUTH)
    return store, client


def set_agents(store: FakeStore, datapath: str) -> None:
    with store._lock:
        for name, hs in list(store._hosts.items()):
            store._hosts[name] = dataclasses.replace(hs, datapath=datapath, heartbeat=1)


@pytest.mark.parametrize("datapath", ["ebpf", "ovs"])
def test_a_write_elsewhere_waits_for_a_dead_agent_only_on_ovs(datapath: str) -> None:
    store, client = dead_agent_cloud(datapath, silence=1.5)
    with client:
        three_hosts(client)
        set_agents(store, datapath)
        client.get("/v1/hosts")  # the API sees the hosts (and their beats) now
        store.down.add("h3")
        started = time.monotonic()
        r = client.post("/v1/containers?wait=true", json={"name": "a", "host": "h2", "ips": [IP]})
        waited = time.monotonic() - started
        assert r.status_code == 201, r.text
        lag = r.json()["lagging"]
        assert [x["host"] for x in lag] == ["h3"], r.text
        listed = {h["name"]: h for h in client.get("/v1/hosts").json()}
        assert listed["h3"]["agent_dead"].startswith("agent lease expired")  # on both datapaths
        assert listed["h2"]["agent_dead"] is None  # control: h2 beats on (auto_converge keeps its status)
        if datapath == "ebpf":
            # down once the lease (0.3 s) ran out, not the silence (1.5 s)
            assert 0.3 <= waited < 1.2, waited
            assert lag[0]["reason"].startswith("agent lease expired"), lag
            assert listed["h3"]["down"].startswith("agent lease expired")
        else:
            # OVS: the switch forwards on, its agent is waited for until the silence rule, as before
            assert waited >= 1.5, waited
            assert lag[0]["reason"].startswith("agent silent"), lag
            assert listed["h3"]["datapath"] == "ovs"
        status = client.get("/v1/status").json()
        h3 = next(h for h in status["hosts"] if h["name"] == "h3")
        assert h3["agent_dead"].startswith("agent lease expired") and h3["down"] is not None


def test_the_hosts_and_status_tables_show_a_down_column_only_when_one_is() -> None:
    import io

    from rich.console import Console

    from portmesh.cli import render

    def table(draw: Callable[[Console, Any], None], data: Any) -> str:
        out = io.StringIO()
        draw(Console(file=out, width=250, color_system=None), data)
        return out.getvalue()

    status = {"switch_generation": 3, "agent_generation": 3, "switch_connected": True}
    up = {"name": "h1", "datapath_id": 1, "underlay_ip": None, "status": status, "down": None, "agent_dead": None}
    assert "DOWN" not in table(render.hosts, [up])  # control: an all-up cloud's table is as it was
    dead = {**up, "name": "h3", "down": "agent lease expired (no heartbeat for 4s)",
            "agent_dead": "agent lease expired (no heartbeat for 4s)"}
    ovs = {**up, "name": "h2", "agent_dead": "agent lease expired (no heartbeat for 5s)"}
    text = table(render.hosts, [up, ovs, dead])
    assert "DOWN" in text.splitlines()[0]
    assert text.splitlines()[2].endswith("agent dead: agent lease expired (no heartbeat for 5s)")
    assert text.splitlines()[3].endswith("  agent lease expired (no heartbeat for 4s)")
    progress = {"switch_generation": 3, "agent_generation": 3, "switch_connected": True, "converged": True}
    st = {"generation": 3, "converged": True, "problems": [], "lagging": [],
          "hosts": [{**progress, "name": "h2", "down": None, "agent_dead": "agent lease expired (no heartbeat for 5s)"}]}
    assert table(render.status, st).splitlines()[-1].endswith("agent dead: agent lease expired (no heartbeat for 5s)")
