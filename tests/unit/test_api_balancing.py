"""Issue 15 through the HTTP API (fake store): several backends with weights, the firewall policy,
the health check, backend add/remove, health and counters in answers; every refusal names the
field and changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Address
from typing import Any

import pytest
from fastapi.testclient import TestClient

from portmesh.api.app import create_app
from portmesh.model.entities import MappingCounters, MappingKey, Proto
from tests.unit.fakes import FakeStore
from tests.unit.test_api import AUTH, IP, TOKEN, add_host, assert_refused

PATH = f"/v1/mappings/{IP}/tcp/80"


@pytest.fixture
def store() -> FakeStore:
    return FakeStore(auto_converge=True)


@pytest.fixture
def client(store: FakeStore) -> Iterator[TestClient]:
    with TestClient(create_app(store, TOKEN, wait_timeout=2.0), headers=AUTH) as c:
        add_host(c)
        for name, ips in (("web-a", [IP]), ("web-b", [IP]), ("web-c", [IP]), ("web-d", [IP]), ("other", ["203.0.113.99"])):
            body = {"name": name, "host": "h1", "ips": ips, "command": ["sleep", "1"]}
            assert c.post("/v1/containers", json=body).status_code == 201
        yield c


def key() -> MappingKey:
    return MappingKey(IPv4Address(IP), Proto.TCP, 80)


def add(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/mappings", json={"public_ip": IP, "port": 80, **body}, params={"wait": "true"})


LB = {"backends": ["web-a", "web-b", "web-c"], "weights": {"web-c": 2}}


def test_add_balanced_mapping_with_policy_and_health(client: TestClient, store: FakeStore) -> None:
    health = {"kind": "http", "path": "/healthz", "expect": 204, "interval": 1, "timeout": 0.5, "threshold": 3}
    r = add(client, **LB, allow=["198.51.100.0/25"], deny=["198.51.100.7/32"], health=health)
    assert r.status_code == 201, r.text
    assert r.json()["converged"] is True
    m = r.json()["mapping"]
    assert m["container"] == "web-a"
    assert [(b["container"], b["weight"], b["health"]) for b in m["backends"]] == [
        ("web-a", 1, "unchecked"),
        ("web-b", 1, "unchecked"),
        ("web-c", 2, "unchecked"),
    ]
    assert (m["allow"], m["deny"]) == (["198.51.100.0/25"], ["198.51.100.7/32"])
    assert m["health"] == {**health, "port": 0, "interval": 1.0}
    stored = store.snapshot().mappings[key()]
    assert stored.names == ("web-a", "web-b", "web-c") and stored.backends[2].weight == 2
    assert [str(n) for n in stored.allow] == ["198.51.100.0/25"] and stored.health is not None
    # The very same request again is idempotent (200, nothing written); another one is a 409 naming port.
    writes = store.writes
    again = add(client, **LB, allow=["198.51.100.0/25"], deny=["198.51.100.7/32"], health=health)
    assert again.status_code == 200 and store.writes == writes
    assert_refused(add(client, backends=["web-a", "web-b"]), 409, "port")
    assert store.writes == writes


def test_container_and_backends_together_must_agree(client: TestClient, store: FakeStore) -> None:
    assert_refused(add(client, container="web-b", backends=["web-a", "web-b"]), 422, "container")
    assert_refused(add(client), 422, "container")
    assert store.snapshot().mappings == {}
    r = add(client, container="web-a", backends=["web-a", "web-b"])
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"backends": ["web-a", "ghost"]}, 404, "backends[1]"),
        ({"backends": ["web-a", "other"]}, 409, "backends[1]"),  # does not hold the IP
        ({"backends": ["web-a", "web-a"]}, 422, "backends[1]"),
        ({"backends": []}, 422, "backends"),
        ({"backends": ["web-a", "Bad/Name"]}, 422, "backends[1]"),
        ({"backends": ["web-a"], "weights": {"web-b": 2}}, 422, "weights.web-b"),
        ({"backends": ["web-a"], "weights": {"web-a": 0}}, 422, "weights.web-a"),
        ({"backends": ["web-a"], "weights": {"web-a": 101}}, 422, "weights.web-a"),
        ({"backends": ["web-a"], "weights": {"web-a": "2"}}, 422, "weights.web-a"),
        ({"container": "web-a", "allow": ["198.51.100.1/25"]}, 422, "allow[0]"),
        ({"container": "web-a", "deny": ["nope"]}, 422, "deny[0]"),
        ({"container": "web-a", "allow": "198.51.100.0/25"}, 422, "allow"),
        ({"container": "web-a", "health": {"kind": "udp"}}, 422, "health.kind"),
        ({"container": "web-a", "health": {"kind": "http", "path": "no-slash"}}, 422, "health.path"),
        ({"container": "web-a", "health": {"kind": "tcp", "interval": 0}}, 422, "health.interval"),
        ({"container": "web-a", "health": {"kind": "tcp", "interval": 1, "timeout": 2}}, 422, "health.timeout"),
        ({"container": "web-a", "health": {"kind": "tcp", "threshold": 11}}, 422, "health.threshold"),
        ({"container": "web-a", "health": {"kind": "tcp", "bogus": 1}}, 422, "health.bogus"),
    ],
)
def test_add_refusals_name_the_field(client: TestClient, store: FakeStore, body: dict[str, Any], status: int, field: str) -> None:
    writes = store.writes
    assert_refused(add(client, **body), status, field)
    assert store.writes == writes and store.snapshot().mappings == {}


def test_port_in_a_block_is_refused_for_every_backend(client: TestClient, store: FakeStore) -> None:
    block = store.snapshot().containers["web-b"].block
    r = client.post("/v1/mappings", json={"public_ip": IP, "port": block.start, "backends": ["web-a", "web-b"]})
    assert_refused(r, 409, "port")
    assert store.snapshot().mappings == {}


def test_get_one_mapping_shows_health_and_counters(client: TestClient, store: FakeStore) -> None:
    assert add(client, **LB, health={"kind": "tcp"}).status_code == 201
    store.health[key()] = {"web-a": "up", "web-b": "down: connection refused"}
    store.counters[key()] = MappingCounters(10, 1000, 3, 180)
    m = client.get(PATH).json()
    assert [(b["container"], b["health"]) for b in m["backends"]] == [
        ("web-a", "up"),
        ("web-b", "down: connection refused"),
        ("web-c", "unchecked"),
    ]
    assert m["counters"] == {"allowed_packets": 10, "allowed_bytes": 1000, "denied_packets": 3, "denied_bytes": 180}
    # The list shows health too (no counters: one read per mapping would not scale).
    [listed] = client.get("/v1/mappings").json()
    assert [b["health"] for b in listed["backends"]] == ["up", "down: connection refused", "unchecked"]
    assert listed["counters"] is None
    assert_refused(client.get(f"/v1/mappings/{IP}/tcp/81"), 404, "mapping")
    assert_refused(client.get(f"/v1/mappings/{IP}/sctp/80"), 422, "proto")


def test_patch_policy_health_weights(client: TestClient, store: FakeStore) -> None:
    assert add(client, **LB, deny=["198.51.100.7/32"]).status_code == 201
    r = client.patch(PATH, json={"allow": ["198.51.100.0/25"]}, params={"wait": "true"})
    assert r.status_code == 200, r.text
    assert r.json()["converged"] is True
    m = store.snapshot().mappings[key()]
    assert [str(n) for n in m.allow] == ["198.51.100.0/25"] and [str(n) for n in m.deny] == ["198.51.100.7/32"]
    r = client.patch(PATH, json={"weights": {"web-a": 3}, "health": {"kind": "tcp", "port": 8080}})
    assert r.status_code == 200, r.text
    m = store.snapshot().mappings[key()]
    assert [b.weight for b in m.backends] == [3, 1, 2] and m.health is not None and m.health.port == 8080
    assert r.json()["mapping"]["health"]["port"] == 8080
    # health: null removes the check; allow: [] opens the mapping; the unchanged deny list stays.
    r = client.patch(PATH, json={"health": None, "allow": []})
    m = store.snapshot().mappings[key()]
    assert m.health is None and m.allow == () and len(m.deny) == 1
    # The same patch again writes nothing.
    writes = store.writes
    assert client.patch(PATH, json={"health": None, "allow": []}).status_code == 200
    assert store.writes == writes


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"allow": ["198.51.100.1/24"]}, 422, "allow[0]"),
        ({"deny": ["x"]}, 422, "deny[0]"),
        ({"weights": {"ghost": 2}}, 422, "weights.ghost"),
        ({"weights": {"web-a": 0}}, 422, "weights.web-a"),
        ({"health": {"kind": "http", "expect": 700}}, 422, "health.expect"),
        ({"container": "web-d"}, 422, "container"),  # not a field of a patch
    ],
)
def test_patch_refusals(client: TestClient, store: FakeStore, body: dict[str, Any], status: int, field: str) -> None:
    assert add(client, **LB).status_code == 201
    before, writes = store.snapshot().mappings, store.writes
    assert_refused(client.patch(PATH, json=body), status, field)
    assert store.writes == writes and store.snapshot().mappings == before


def test_patch_unknown_mapping_is_404(client: TestClient, store: FakeStore) -> None:
    assert_refused(client.patch(PATH, json={"allow": []}), 404, "mapping")


def test_backend_add_and_remove(client: TestClient, store: FakeStore) -> None:
    assert add(client, container="web-a").status_code == 201
    r = client.post(f"{PATH}/backends", json={"container": "web-d", "weight": 2}, params={"wait": "true"})
    assert r.status_code == 201, r.text
    assert r.json()["converged"] is True
    assert [(b["container"], b["weight"]) for b in r.json()["mapping"]["backends"]] == [("web-a", 1), ("web-d", 2)]
    assert store.snapshot().mappings[key()].names == ("web-a", "web-d")
    r = client.delete(f"{PATH}/backends/web-a", params={"wait": "true"})
    assert r.status_code == 200, r.text
    m = store.snapshot().mappings[key()]
    assert m.names == ("web-d",) and m.container == "web-d"
    assert r.json()["mapping"]["container"] == "web-d"


@pytest.mark.parametrize(
    ("method", "suffix", "body", "status", "field"),
    [
        ("POST", "/backends", {"container": "ghost"}, 404, "container"),
        ("POST", "/backends", {"container": "web-b"}, 409, "container"),  # already a backend
        ("POST", "/backends", {"container": "other"}, 409, "public_ip"),  # does not hold the IP
        ("POST", "/backends", {"container": "web-d", "weight": 0}, 422, "weight"),
        ("POST", "/backends", {"container": "web-d", "weight": True}, 422, "weight"),
        ("POST", "/backends", {"container": "Bad"}, 422, "container"),
        ("POST", "/backends", {}, 422, "container"),
        ("DELETE", "/backends/web-d", None, 404, "container"),  # not a backend
        ("DELETE", "/backends/web-b", None, 409, "container"),  # the last one
    ],
)
def test_backend_refusals(
    client: TestClient, store: FakeStore, method: str, suffix: str, body: Any, status: int, field: str
) -> None:
    assert add(client, container="web-a").status_code == 201
    assert client.delete(f"{PATH}/backends/web-a").status_code == 409  # the last one
    assert client.post(f"{PATH}/backends", json={"container": "web-b"}).status_code == 201
    assert client.delete(f"{PATH}/backends/web-a").status_code == 200  # now web-b alone
    before, writes = store.snapshot().mappings, store.writes
    assert_refused(client.request(method, PATH + suffix, json=body), status, field)
    assert store.writes == writes and store.snapshot().mappings == before


def test_backend_calls_on_unknown_mapping_are_404(client: TestClient, store: FakeStore) -> None:
    assert_refused(client.post(f"{PATH}/backends", json={"container": "web-a"}), 404, "mapping")
    assert_refused(client.delete(f"{PATH}/backends/web-a"), 404, "mapping")
    assert store.snapshot().mappings == {}


def test_removing_a_backend_container_keeps_the_mapping(client: TestClient, store: FakeStore) -> None:
    assert add(client, **LB).status_code == 201
    assert client.delete("/v1/containers/web-a").status_code == 200
    m = client.get(PATH).json()
    assert m["container"] == "web-b" and [b["container"] for b in m["backends"]] == ["web-b", "web-c"]
    names = [mm["port"] for mm in client.get("/v1/containers/web-c").json()["mappings"]]
    assert names == [80]


def test_openapi_documents_the_new_calls(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"get", "patch", "delete"} <= set(paths["/v1/mappings/{public_ip}/{proto}/{port}"])
    assert "post" in paths["/v1/mappings/{public_ip}/{proto}/{port}/backends"]
    assert "delete" in paths["/v1/mappings/{public_ip}/{proto}/{port}/backends/{container}"]


def test_write_answers_show_reported_health(client: TestClient, store: FakeStore) -> None:
    assert add(client, **LB, health={"kind": "tcp"}).status_code == 201
    store.health[key()] = {"web-a": "up", "web-b": "down: timeout"}
    r = client.post(f"{PATH}/backends", json={"container": "web-d"})
    assert r.status_code == 201, r.text
    assert [b["health"] for b in r.json()["mapping"]["backends"]] == ["up", "down: timeout", "unchecked", "unchecked"]
