"""The API of many hosts (issue 12), against the fake store: config and pools in the store,
host roles and underlay addresses, and waiting per host (a dead host stalls only what concerns it)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from typing import Any

import pytest
from fastapi.testclient import TestClient

from portmesh.api.app import create_app
from portmesh.model.config import DEFAULT_CONFIG
from tests.unit.fakes import FakeStore
from tests.unit.test_api import AUTH, IP, TOKEN, assert_refused

POOL2 = "198.51.100.0/24"
IP2 = "198.51.100.7"


@pytest.fixture
def store() -> FakeStore:
    return FakeStore(auto_converge=True)


@pytest.fixture
def client(store: FakeStore) -> Iterator[TestClient]:
    with TestClient(create_app(store, TOKEN, wait_timeout=2.0), headers=AUTH) as c:
        yield c


def post(client: TestClient, path: str, body: dict[str, Any], status: int = 201) -> dict[str, Any]:
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    out: dict[str, Any] = r.json()
    return out


def three_hosts(client: TestClient) -> None:
    for n in (1, 2, 3):
        post(client, "/v1/hosts", {"name": f"h{n}", "underlay_ip": f"198.19.0.{10 + n}"})


# --- configuration: the API validates against the store's config, not a constant ---


def test_container_ips_are_checked_against_the_stores_pools(client: TestClient, store: FakeStore) -> None:
    three_hosts(client)
    r = client.post("/v1/containers", json={"name": "a", "host": "h2", "ips": [IP2]})
    assert_refused(r, 409, "ips")  # not a pool yet
    post(client, "/v1/pools", {"pool": POOL2})
    assert IPv4Network(POOL2) in store.snapshot().config.public_pools
    post(client, "/v1/containers", {"name": "a", "host": "h2", "ips": [IP2]})  # positive control


def test_block_size_comes_from_the_store(client: TestClient, store: FakeStore) -> None:
    three_hosts(client)
    store.set_config(dataclasses.replace(DEFAULT_CONFIG, block_size=256))
    c = post(client, "/v1/containers", {"name": "a", "host": "h1", "ips": [IP]})["container"]
    assert c["block"]["size"] == 256


def test_config_show_and_patch(client: TestClient, store: FakeStore) -> None:
    shown = client.get("/v1/config").json()
    assert shown["public_pools"] == ["203.0.113.0/24"] and shown["vxlan_port"] == 4789
    r = client.patch("/v1/config?wait=true", json={"container_mtu": 1400, "vxlan_vni": 77})
    assert r.status_code == 200, r.text
    assert r.json()["config"]["container_mtu"] == 1400 and r.json()["converged"]
    assert store.snapshot().config.container_mtu == 1400 and store.snapshot().config.vxlan_vni == 77
    gen = store.snapshot().generation
    assert client.patch("/v1/config", json={"container_mtu": 1400}).json()["generation"] == gen  # no change, no write


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"block_size": 1000}, "block_size"),
        ({"block_size": 16}, "block_size"),
        ({"container_mtu": 100}, "container_mtu"),
        ({"container_mtu": "1400"}, "container_mtu"),
        ({"gateway_ip": "10.0.0.1"}, "gateway_ip"),
        ({"gateway_ip": "nope"}, "gateway_ip"),
        ({"vxlan_vni": 0}, "vxlan_vni"),
        ({"vxlan_port": 70000}, "vxlan_port"),
        ({"protected_networks": ["198.18.0.1/15"]}, "protected_networks[0]"),
        ({"protected_networks": ["0.0.0.0/0"]}, "protected_networks[0]"),
        ({"public_pools": ["192.0.2.0/24"]}, "public_pools"),  # pools: /v1/pools
    ],
)
def test_config_bad_values_422(client: TestClient, store: FakeStore, body: dict[str, Any], field: str) -> None:
    before = store.snapshot()
    assert_refused(client.patch("/v1/config", json=body), 422, field)
    assert store.snapshot() == before


def test_config_refused_while_containers_exist(client: TestClient, store: FakeStore) -> None:
    three_hosts(client)
    post(client, "/v1/containers", {"name": "a", "host": "h1", "ips": [IP]})
    assert_refused(client.patch("/v1/config", json={"block_size": 512}), 409, "block_size")
    assert_refused(client.patch("/v1/config", json={"vxlan_port": 4790}), 409, "vxlan_port")
    assert client.patch("/v1/config", json={"block_size": 1024}).status_code == 200  # unchanged: fine
    assert client.delete("/v1/containers/a").status_code == 200
    assert client.patch("/v1/config", json={"block_size": 512}).status_code == 200  # positive control


# --- pools ---


def test_pools_add_list_remove(client: TestClient, store: FakeStore) -> None:
    three_hosts(client)
    out = post(client, "/v1/pools?wait=true", {"pool": POOL2})
    assert out["pool"] == {"pool": POOL2, "size": 256, "used": 0} and out["converged"]
    post(client, "/v1/containers", {"name": "a", "host": "h2", "ips": [IP2]})
    pools = {p["pool"]: p for p in client.get("/v1/pools").json()}
    assert set(pools) == {"203.0.113.0/24", POOL2} and pools[POOL2]["used"] == 1
    r = client.delete("/v1/pools/198.51.100.0/24")
    assert_refused(r, 409, "pool")
    assert "'a'" in r.json()["detail"]["reason"]
    assert client.delete("/v1/containers/a").status_code == 200
    gen = store.snapshot().generation
    r = client.delete("/v1/pools/198.51.100.0/24?wait=true")
    assert r.status_code == 200, r.text
    assert r.json()["generation"] == gen + 1
    assert [str(p) for p in store.snapshot().config.public_pools] == ["203.0.113.0/24"]
    assert_refused(client.delete("/v1/pools/198.51.100.0/24"), 404, "pool")


@pytest.mark.parametrize(
    ("pool", "status"),
    [
        ("198.51.100.1/24", 422),  # host bits
        ("198.51.100.0", 422),
        ("nope/24", 422),
        ("198.51.100.0/33", 422),
        ("127.0.0.0/24", 422),
        ("169.254.0.0/24", 422),
        ("203.0.113.128/25", 409),  # overlaps the default pool
        ("198.18.0.0/24", 409),  # protected
        ("198.19.0.0/24", 409),  # protected (and the hosts' underlay)
    ],
)
def test_pool_add_refused(client: TestClient, store: FakeStore, pool: str, status: int) -> None:
    three_hosts(client)
    before = store.snapshot()
    assert_refused(client.post("/v1/pools", json={"pool": pool}), status, "pool")
    assert store.snapshot() == before


def test_pool_remove_bad_path(client: TestClient) -> None:
    assert_refused(client.delete("/v1/pools/nope/24"), 422, "address")
    assert_refused(client.delete("/v1/pools/198.51.100.0/40"), 422, "prefix")
    assert_refused(client.delete("/v1/pools/203.0.113.1/24"), 404, "pool")  # host bits: never a pool


# --- hosts: roles, underlay, removal, listing ---


def test_host_roles_default_and_given(client: TestClient, store: FakeStore) -> None:
    three_hosts(client)
    assert [h["role"] for h in client.get("/v1/hosts").json()] == ["gateway", "compute", "compute"]
    post(client, "/v1/hosts", {"name": "h4", "role": "gateway", "underlay_ip": "198.19.0.14"})
    assert store.snapshot().hosts["h4"].role.value == "gateway"
    assert_refused(client.post("/v1/hosts", json={"name": "h5", "role": "router"}), 422, "role")


def test_host_underlay_checked(client: TestClient, store: FakeStore) -> None:
    three_hosts(client)
    assert_refused(client.post("/v1/hosts", json={"name": "h4", "underlay_ip": "198.19.0.11"}), 409, "underlay_ip")
    # Well-formed but unusable in this cloud: 409, as an IP outside the pools is for a container.
    assert_refused(client.post("/v1/hosts", json={"name": "h4", "underlay_ip": IP}), 409, "underlay_ip")
    assert_refused(client.post("/v1/hosts", json={"name": "h4", "underlay_ip": "0.0.0.0"}), 409, "underlay_ip")
    assert_refused(client.post("/v1/hosts", json={"name": "h4", "underlay_ip": "1.2.3"}), 422, "underlay_ip")
    assert "h4" not in store.snapshot().hosts
    post(client, "/v1/hosts", {"name": "h4", "underlay_ip": "198.19.0.14"})  # positive control


def test_host_remove(client: TestClient, store: FakeStore) -> None:
    three_hosts(client)
    post(client, "/v1/containers", {"name": "a", "host": "h3", "ips": [IP]})
    r = client.delete("/v1/hosts/h3")
    assert_refused(r, 409, "name")
    assert "'a'" in r.json()["detail"]["reason"]
    assert_refused(client.delete("/v1/hosts/ghost"), 404, "name")
    assert client.delete("/v1/containers/a").status_code == 200
    r = client.delete("/v1/hosts/h3?wait=true")
    assert r.status_code == 200 and r.json()["converged"], r.text
    assert set(store.snapshot().hosts) == {"h1", "h2"}


def test_hosts_listing(client: TestClient, store: FakeStore) -> None:
    three_hosts(client)
    post(client, "/v1/containers", {"name": "a", "host": "h2", "ips": [IP]})
    store.report_tunnels("h1", {"h2": "up", "h3": "down: no route"})
    hosts = {h["name"]: h for h in client.get("/v1/hosts").json()}
    h1 = hosts["h1"]
    assert h1["role"] == "gateway" and h1["underlay_ip"] == "198.19.0.11" and h1["containers"] == 0
    assert h1["tunnels"] == [
        {"peer": "h2", "up": True, "state": "up"},
        {"peer": "h3", "up": False, "state": "down: no route"},
    ]
    assert h1["status"]["switch_connected"] and h1["status"]["agent_generation"] == store.snapshot().generation
    assert hosts["h2"]["containers"] == 1 and hosts["h2"]["role"] == "compute"
    assert client.get("/v1/hosts/h2").json()["containers"] == 1


# --- waiting per host (issue 12 item 8) ---


def disconnect(store: FakeStore, host: str) -> None:
    """The host dies: its switch drops off the controller, nothing reports any more."""
    store.down.add(host)
    st = store.host_status(host)
    store.report_switch(host, st.switch_generation, False)


def test_unrelated_host_down_does_not_block(client: TestClient, store: FakeStore) -> None:
    three_hosts(client)
    disconnect(store, "h3")
    started = time.monotonic()
    r = client.post("/v1/containers?wait=true&timeout=5", json={"name": "a", "host": "h2", "ips": [IP], "ports": [{"port": 80}]})
    assert r.status_code == 201, r.text
    assert time.monotonic() - started < 1.0
    body = r.json()
    assert body["converged"] is True
    assert body["lagging"] == [{"host": "h3", "reason": "switch disconnected"}]
    for method, path in (("post", "/v1/containers/a/stop"), ("post", "/v1/containers/a/start")):
        r = client.request(method, f"{path}?wait=true&timeout=5")
        assert r.status_code == 200 and r.json()["lagging"][0]["host"] == "h3", r.text
    r = client.delete("/v1/mappings/203.0.113.10/tcp/80?wait=true&timeout=5")
    assert r.status_code == 200 and r.json()["lagging"] == [{"host": "h3", "reason": "switch disconnected"}], r.text
    st = client.get("/v1/status").json()
    assert not st["converged"] and st["lagging"][0]["host"] == "h3"
    assert [h["down"] for h in st["hosts"]] == [None, None, "switch disconnected"]


def test_concerned_host_down_times_out_naming_it(client: TestClient, store: FakeStore) -> None:
    three_hosts(client)
    disconnect(store, "h3")
    r = client.post("/v1/containers?wait=true&timeout=0.3", json={"name": "a", "host": "h3", "ips": [IP]})
    assert_refused(r, 504, "wait")
    assert "h3 (switch disconnected)" in r.json()["detail"]["reason"]
    assert "h2" not in r.json()["detail"]["reason"]
    assert "a" in store.snapshot().containers  # written all the same


def test_gateway_down_concerns_every_container_write(client: TestClient, store: FakeStore) -> None:
    three_hosts(client)
    disconnect(store, "h1")  # the gateway: inbound arrives there
    r = client.post("/v1/containers?wait=true&timeout=0.3", json={"name": "a", "host": "h2", "ips": [IP]})
    assert_refused(r, 504, "wait")
    assert "h1 (switch disconnected)" in r.json()["detail"]["reason"]


def test_silent_agent_counts_as_down_after_silence() -> None:
    store = FakeStore(auto_converge=True)
    with TestClient(create_app(store, TOKEN, wait_timeout=5.0, agent_silence=0.3), headers=AUTH) as client:
        three_hosts(client)
        store.down.add("h3")  # agent and controller stop reporting; the switch still looks connected
        started = time.monotonic()
        r = client.post("/v1/containers?wait=true", json={"name": "a", "host": "h2", "ips": [IP]})
        assert r.status_code == 201, r.text
        waited = time.monotonic() - started
        assert 0.3 <= waited < 3.0  # waited for the agent until it counted as silent, not the full 5 s
        lag = r.json()["lagging"]
        assert [x["host"] for x in lag] == ["h3"] and lag[0]["reason"].startswith("agent silent")
        started = time.monotonic()  # the next write knows already
        r = client.post("/v1/containers?wait=true", json={"name": "b", "host": "h2", "ips": [IP]})
        assert r.status_code == 201 and time.monotonic() - started < 0.3, r.text
        store.down.discard("h3")
        store.converge()  # it comes back: nobody lags
        r = client.post("/v1/containers?wait=true", json={"name": "c", "host": "h2", "ips": [IP]})
        assert r.status_code == 201 and r.json()["lagging"] == [], r.text


def test_config_and_pool_writes_wait_out_a_create_in_flight() -> None:
    """Creates take no lock: a config change or pool removal while one is being written would strand it."""
    import asyncio

    from portmesh.api.config_schemas import ConfigPatch
    from portmesh.api.service import Service
    from portmesh.model.entities import PortBlock
    from portmesh.model.errors import Conflict

    store = FakeStore(auto_converge=True)
    store.set_config(dataclasses.replace(DEFAULT_CONFIG, public_pools=(*DEFAULT_CONFIG.public_pools, IPv4Network(POOL2))))
    svc = Service(store)
    svc._claiming.add((PortBlock(32768, 1024), IP2))  # a create on 198.51.100.7 being committed
    with pytest.raises(Conflict) as refused:
        asyncio.run(svc.set_config(ConfigPatch(block_size=512)))
    assert refused.value.field == "body"
    with pytest.raises(Conflict) as refused:
        asyncio.run(svc.remove_pool("198.51.100.0", 24))
    assert refused.value.field == "pool" and IP2 in refused.value.reason
    svc._claiming.clear()  # positive control: once it is written (or not), both go through
    asyncio.run(svc.set_config(ConfigPatch(block_size=512)))
    asyncio.run(svc.remove_pool("198.51.100.0", 24))
    assert store.snapshot().config.block_size == 512 and len(store.snapshot().config.public_pools) == 1


def test_host_add_does_not_wait_for_the_new_host_itself(client: TestClient, store: FakeStore) -> None:
    """An operator registers a host before its agent runs: the answer names it, without a 504."""
    store.down.add("h1")  # its agent and switch are not running yet
    started = time.monotonic()
    out = post(client, "/v1/hosts?wait=true&timeout=5", {"name": "h1", "underlay_ip": "198.19.0.11"})
    assert time.monotonic() - started < 1.0
    assert out["host"]["role"] == "gateway" and out["lagging"] == [{"host": "h1", "reason": "switch disconnected"}]
    # Positive control: a later write that concerns h1 (the gateway) does wait for it, and times out naming it.
    r = client.post("/v1/hosts?wait=true&timeout=0.3", json={"name": "h2", "underlay_ip": "198.19.0.12"})
    assert_refused(r, 504, "wait")
    assert "h1 (switch disconnected)" in r.json()["detail"]["reason"]
