"""Schema 1.4.0 on a real ovsdb-server: the cloud's config in the Global row, host roles, tunnel reports;
the IDL client and the controller's lean reader see the same desired state."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from portmesh.model.config import DEFAULT_CONFIG
from portmesh.model.entities import Host, HostRole, HostStatus
from portmesh.model.errors import NotFound
from portmesh.store.client import Store
from portmesh.store.reader import StateReader
from tests.switch.test_store import server
from tests.switch.test_store_mirror import wait_until

__all__ = ["server"]  # the fixture, re-used

CONFIG = replace(
    DEFAULT_CONFIG,
    public_pools=(IPv4Network("198.51.100.0/25"), IPv4Network("203.0.113.0/24")),
    gateway_ip=IPv4Address("169.254.7.1"),
    block_size=512,
    container_mtu=1400,
    protected_networks=(IPv4Network("198.18.0.0/24"), IPv4Network("198.19.0.0/24")),
    vxlan_vni=77,
    vxlan_port=8472,
)


@pytest.fixture
def clients(server: str) -> Iterator[tuple[Store, StateReader]]:
    with Store(server, timeout=5) as store, StateReader(server, timeout=5) as reader:
        yield store, reader


def test_a_new_store_holds_the_default_config(clients: tuple[Store, StateReader]) -> None:
    store, reader = clients
    assert store.snapshot().config == DEFAULT_CONFIG
    assert reader.snapshot().config == DEFAULT_CONFIG
    assert store.snapshot().generation == 0  # the row is there before any write


def test_set_config_bumps_once_and_both_readers_see_it(clients: tuple[Store, StateReader]) -> None:
    store, reader = clients
    generation = store.set_config(CONFIG)
    assert generation == 1
    assert store.snapshot().config == CONFIG
    wait_until(lambda: reader.snapshot().generation == generation)
    assert reader.snapshot() == store.snapshot()
    assert store.set_config(CONFIG) == generation  # unchanged: no bump
    none = replace(CONFIG, public_pools=(), protected_networks=())
    assert store.set_config(none) == generation + 1
    assert store.snapshot().config.public_pools == ()  # empty means no pools, not the default
    wait_until(lambda: reader.snapshot().generation == generation + 1)
    assert reader.snapshot().config == none


def test_host_role_round_trips(clients: tuple[Store, StateReader]) -> None:
    store, reader = clients
    store.add_host(Host("h1", 1, IPv4Address("198.19.0.11"), HostRole.GATEWAY))
    generation = store.add_host(Host("h2", 2, IPv4Address("198.19.0.12"), HostRole.COMPUTE))
    wait_until(lambda: reader.snapshot().generation == generation)
    for state in (store.snapshot(), reader.snapshot()):
        assert state.hosts["h1"].role is HostRole.GATEWAY
        assert state.hosts["h2"].role is HostRole.COMPUTE
        assert state.gateway_for("h2") == "h1"
    # A role change is a desired-state change (add_host may_exist).
    assert store.add_host(Host("h2", 2, IPv4Address("198.19.0.12"), HostRole.GATEWAY), may_exist=True) == generation + 1
    assert store.snapshot().hosts["h2"].role is HostRole.GATEWAY


def test_report_tunnels_is_status_written_only_when_different(clients: tuple[Store, StateReader]) -> None:
    store, reader = clients
    generation = store.add_host(Host("h1", 1, IPv4Address("198.19.0.11")))
    wait_until(lambda: reader.snapshot().generation == generation)
    wakeups: list[int] = []
    reader.subscribe(lambda: wakeups.append(1))
    with Store(store.remote, timeout=5) as other:
        store.report_tunnels("h1", {"h3": "down: no route", "h2": "up"})
        want = HostStatus(tunnels=(("h2", "up"), ("h3", "down: no route")))
        wait_until(lambda: other.host_status("h1").tunnels == want.tunnels)
        assert store.host_status("h1").tunnels == want.tunnels
        assert store.snapshot().generation == generation  # a status report: no bump
        seqno = store._idl.change_seqno
        store.report_tunnels("h1", {"h2": "up", "h3": "down: no route"})  # the same: nothing sent
        time.sleep(0.2)
        assert store._idl.change_seqno == seqno
        store.report_tunnels("h1", {})
        wait_until(lambda: other.host_status("h1").tunnels == ())
    time.sleep(0.3)
    assert not wakeups, "tunnel reports woke the controller's reader"
    store.add_host(Host("h2", 2))  # positive control: a desired change does wake it
    wait_until(lambda: bool(wakeups))
    with pytest.raises(NotFound) as err:
        store.report_tunnels("nope", {"h1": "up"})
    assert err.value.field == "host"
