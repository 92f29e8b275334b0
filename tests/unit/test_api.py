"""The HTTP API against the in-memory fake store: answers, error bodies, auth, waiting."""

from __future__ import annotations

import asyncio
import json
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from portmesh.api.app import create_app
from portmesh.api.logs import plain_lines
from portmesh.api.token import load_or_create_token
from portmesh.model.entities import ContainerStatus, RestartPolicy, RunState
from tests.unit.fakes import FakeStore

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
IP = "203.0.113.10"


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def client(store: FakeStore) -> Iterator[TestClient]:
    # Every /v1 call needs the token, reads too; tests of refusal use a client without it.
    with TestClient(create_app(store, TOKEN, wait_timeout=2.0), headers=AUTH) as c:
        yield c


def add_host(client: TestClient, name: str = "h1") -> dict[str, Any]:
    r = client.post("/v1/hosts", json={"name": name}, headers=AUTH)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def add_web(client: TestClient, name: str = "web", ports: tuple[int, ...] = (80, 443)) -> dict[str, Any]:
    body = {"name": name, "host": "h1", "ips": [IP], "ports": [{"port": p} for p in ports], "command": ["sleep", "1"]}
    r = client.post("/v1/containers", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def assert_refused(r: httpx.Response, status: int, field: str) -> None:
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert detail["field"] == field, detail
    assert detail["reason"]


# --- happy paths ---


def test_hosts(client: TestClient) -> None:
    out = add_host(client)
    assert out["generation"] == 1
    assert out["host"]["datapath_id"] == 1
    second = client.post("/v1/hosts", json={"name": "h2", "underlay_ip": "198.18.0.11"}, headers=AUTH).json()
    assert second["host"]["datapath_id"] == 2
    listed = client.get("/v1/hosts").json()
    assert [h["name"] for h in listed] == ["h1", "h2"]
    one = client.get("/v1/hosts/h2").json()
    assert one["underlay_ip"] == "198.18.0.11"
    assert one["status"] == {"switch_generation": 0, "agent_generation": 0, "switch_connected": False}


def test_container_with_mappings_in_one_transaction(client: TestClient, store: FakeStore) -> None:
    add_host(client)
    writes = store.writes
    out = add_web(client)
    assert store.writes == writes + 1
    c = out["container"]
    assert out["generation"] == store.snapshot().generation
    assert c["ips"] == [IP] and c["running"] is True and c["status"] is None
    assert c["block"] == {"start": 32768, "end": 33791, "size": 1024}
    assert {(m["port"], m["proto"]) for m in c["mappings"]} == {(80, "tcp"), (443, "tcp")}
    detail = client.get("/v1/containers/web").json()
    assert detail == c
    assert [x["name"] for x in client.get("/v1/containers").json()] == ["web"]


def test_second_sharer_gets_its_own_block(client: TestClient) -> None:
    add_host(client)
    add_web(client)
    db = add_web(client, "db", ports=(5432,))["container"]
    assert db["block"]["start"] == 33792


def test_stop_start_remove(client: TestClient, store: FakeStore) -> None:
    add_host(client)
    add_web(client)
    assert client.post("/v1/containers/web/stop", headers=AUTH).status_code == 200
    assert client.get("/v1/containers/web").json()["running"] is False
    assert client.post("/v1/containers/web/start", headers=AUTH).status_code == 200
    assert client.get("/v1/containers/web").json()["running"] is True
    r = client.delete("/v1/containers/web", headers=AUTH)
    assert r.status_code == 200 and r.json()["generation"] == store.snapshot().generation
    assert client.get("/v1/containers").json() == []
    assert client.get("/v1/mappings").json() == []


def test_mappings(client: TestClient) -> None:
    add_host(client)
    add_web(client, ports=())
    r = client.post("/v1/mappings", json={"public_ip": IP, "port": 22, "container": "web"}, headers=AUTH)
    assert r.status_code == 201, r.text
    plain = {"public_ip": IP, "proto": "tcp", "port": 22, "container": "web"}
    one = [{"container": "web", "weight": 1, "health": "unchecked"}]
    assert r.json()["mapping"] == {**plain, "backends": one, "allow": [], "deny": [], "health": None, "counters": None}
    r = client.post("/v1/mappings", json={"public_ip": IP, "port": 53, "proto": "UDP", "container": "web"}, headers=AUTH)
    assert r.status_code == 201
    assert [(m["port"], m["proto"]) for m in client.get("/v1/mappings").json()] == [(22, "tcp"), (53, "udp")]
    assert client.delete(f"/v1/mappings/{IP}/udp/53", headers=AUTH).status_code == 200
    assert len(client.get("/v1/mappings").json()) == 1


def test_openapi_and_docs(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "/v1/containers" in spec["paths"]
    assert client.get("/docs").status_code == 200


# --- refusals: status, field named, nothing changed ---


def test_every_call_needs_the_token(client: TestClient, store: FakeStore) -> None:
    add_host(client)  # positive control: with the token
    add_web(client)
    writes = store.writes
    with TestClient(client.app) as bare:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = bare.post("/v1/hosts", json={"name": "h2"}, headers=headers)
            assert_refused(r, 401, "authorization")
            assert r.headers["www-authenticate"] == "Bearer"
        assert_refused(bare.delete("/v1/containers/web"), 401, "authorization")
        # Reads too, as Docker's and Kubernetes' APIs: a container's command and logs are not public.
        for path in ("/v1/hosts", "/v1/hosts/h1", "/v1/containers", "/v1/containers/web", "/v1/mappings", "/v1/status"):
            assert_refused(bare.get(path), 401, "authorization")
            assert client.get(path).status_code == 200, path
        assert_refused(bare.get("/v1/containers/web/logs"), 401, "authorization")
        # Health and the API's description stay open.
        assert bare.get("/healthz").json() == {"status": "ok"}
        assert "/v1/containers" in bare.get("/openapi.json").json()["paths"]
        assert bare.get("/docs").status_code == 200
    assert store.writes == writes


@pytest.mark.parametrize(
    ("change", "status", "field"),
    [
        ({"host": "nope"}, 404, "host"),
        ({"name": "Bad Name"}, 422, "name"),
        ({"ips": ["not-an-ip"]}, 422, "ips[0]"),
        ({"ips": ["192.0.2.1"]}, 409, "ips"),
        ({"ips": []}, 422, "ips"),
        ({"ports": [{"port": 80}, {"port": 70000}]}, 422, "ports[1].port"),
        ({"ports": [{"port": 80, "proto": "sctp"}]}, 422, "ports[0].proto"),
        ({"ports": [{"port": 5432}]}, 409, "port"),  # already mapped to db
        ({"ports": [{"port": 33000}]}, 409, "port"),  # inside db's ephemeral block
        ({"name": "db"}, 409, "name"),
        ({"ips": "203.0.113.10"}, 422, "ips"),  # pydantic: not a list
        ({"command": "sleep 1"}, 422, "command"),
    ],
)
def test_container_refusals(client: TestClient, store: FakeStore, change: dict[str, Any], status: int, field: str) -> None:
    add_host(client)
    add_web(client, "db", ports=(5432,))
    before, writes = store.snapshot(), store.writes
    body = {"name": "web", "host": "h1", "ips": [IP], "ports": [{"port": 80}], **change}
    assert_refused(client.post("/v1/containers", json=body, headers=AUTH), status, field)
    assert store.writes == writes and store.snapshot() == before


def test_a_port_listed_twice_is_one_mapping(client: TestClient) -> None:
    add_host(client)
    body = {"name": "web", "host": "h1", "ips": [IP], "ports": [{"port": 80}, {"port": 80, "proto": "TCP"}]}
    r = client.post("/v1/containers", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    assert [(m["port"], m["proto"]) for m in r.json()["container"]["mappings"]] == [(80, "tcp")]


def test_missing_field_is_named(client: TestClient) -> None:
    r = client.post("/v1/containers", json={"host": "h1", "name": "web"}, headers=AUTH)
    assert_refused(r, 422, "ips")
    assert r.json()["errors"][0]["field"] == "ips"


def test_host_refusals(client: TestClient, store: FakeStore) -> None:
    add_host(client)
    writes = store.writes
    assert_refused(client.post("/v1/hosts", json={"name": "h1"}, headers=AUTH), 409, "name")
    assert_refused(client.post("/v1/hosts", json={"name": "h2", "datapath_id": 1}, headers=AUTH), 409, "datapath_id")
    assert_refused(client.post("/v1/hosts", json={"name": "h2", "datapath_id": 0}, headers=AUTH), 422, "datapath_id")
    assert_refused(client.post("/v1/hosts", json={"name": "h2", "underlay_ip": "x"}, headers=AUTH), 422, "underlay_ip")
    assert store.writes == writes
    assert_refused(client.get("/v1/hosts/nope"), 404, "name")


def test_mapping_refusals(client: TestClient, store: FakeStore) -> None:
    add_host(client)
    add_web(client)
    add_web(client, "db", ports=(5432,))
    writes = store.writes

    def post(**body: Any) -> httpx.Response:
        payload = {"public_ip": IP, "port": 22, "container": "web", **body}
        r: httpx.Response = client.post("/v1/mappings", json=payload, headers=AUTH)
        return r

    assert_refused(post(container="nope"), 404, "container")
    assert_refused(post(public_ip="203.0.113.99"), 409, "public_ip")
    assert_refused(post(public_ip="nope"), 422, "public_ip")
    again = post(port=80)  # the very same mapping: idempotent (may_exist), nothing written
    assert again.status_code == 200, again.text
    assert again.json()["mapping"]["container"] == "web"
    assert_refused(post(port=0), 422, "port")
    assert_refused(post(proto="icmp"), 422, "proto")
    assert_refused(client.delete(f"/v1/mappings/{IP}/tcp/22", headers=AUTH), 404, "mapping")
    assert_refused(client.delete(f"/v1/mappings/{IP}/tcp/http", headers=AUTH), 422, "port")
    assert store.writes == writes


def test_unknown_container(client: TestClient, store: FakeStore) -> None:
    for method, path in (("GET", "/v1/containers/x"), ("DELETE", "/v1/containers/x"), ("POST", "/v1/containers/x/stop")):
        assert_refused(client.request(method, path, headers=AUTH), 404, "name")
    assert store.writes == 0


# --- convergence and waiting ---


def test_status_converges(client: TestClient, store: FakeStore) -> None:
    assert client.get("/v1/status").json() == {"generation": 0, "converged": True, "hosts": [], "problems": [], "lagging": []}
    add_host(client)
    st = client.get("/v1/status").json()
    assert st["generation"] == 1 and not st["converged"] and not st["hosts"][0]["converged"]
    store.converge()
    st = client.get("/v1/status").json()
    assert st["converged"] and st["hosts"][0]["switch_connected"]


def test_wait_times_out_with_504(client: TestClient, store: FakeStore) -> None:
    add_host(client)
    r = client.post("/v1/hosts?wait=true&timeout=0.2", json={"name": "h2"}, headers=AUTH)
    assert_refused(r, 504, "wait")
    body = r.json()
    assert body["generation"] == 2 and body["status"]["converged"] is False
    assert store.snapshot().generation == 2  # the write itself happened


def test_wait_returns_when_hosts_catch_up(client: TestClient, store: FakeStore) -> None:
    add_host(client)
    store.converge()
    timer = threading.Timer(0.1, store.converge)  # reports arrive while the request waits
    timer.start()
    try:
        r = client.post("/v1/containers?wait=true&timeout=5", json={"name": "a", "host": "h1", "ips": [IP]}, headers=AUTH)
    finally:
        timer.join()
    assert r.status_code == 201, r.text
    assert r.json()["converged"] is True


def test_wait_with_auto_converging_store() -> None:
    store = FakeStore(auto_converge=True)
    with TestClient(create_app(store, TOKEN), headers=AUTH) as client:
        add_host(client)
        r = client.post("/v1/hosts?wait=true", json={"name": "h2"}, headers=AUTH)
        assert r.status_code == 201 and r.json()["converged"] is True


def test_concurrent_creates_are_serialised() -> None:
    store = FakeStore()
    app = create_app(store, TOKEN)

    async def race() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
            await c.post("/v1/hosts", json={"name": "h1"}, headers=AUTH)
            body = {"name": "web", "host": "h1", "ips": [IP], "ports": [{"port": 80}]}
            rs = await asyncio.gather(*(c.post("/v1/containers", json=body, headers=AUTH) for _ in range(8)))
            return sorted(r.status_code for r in rs)

    assert asyncio.run(race()) == [201] + [409] * 7


def test_store_unavailable_is_503(store: FakeStore, monkeypatch: pytest.MonkeyPatch) -> None:
    class Down(RuntimeError):
        pass

    def refuse(*_: object) -> int:
        raise Down("store did not answer within 10 s")

    with TestClient(create_app(store, TOKEN, unavailable=(Down,)), headers=AUTH) as client:
        add_host(client)
        monkeypatch.setattr(store, "add_container", refuse)
        r = client.post("/v1/containers", json={"name": "a", "host": "h1", "ips": [IP]}, headers=AUTH)
        assert_refused(r, 503, "store")
        assert "10 s" not in r.text and "did not answer" not in r.text  # no exception text in a 5xx
        assert r.json()["request_id"] in r.json()["detail"]["reason"]


# --- token ---


def test_token_file(tmp_path: Path) -> None:
    path = tmp_path / "run" / "token"
    token, created = load_or_create_token(path, env={})
    assert created and len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(path, env={}) == (token, False)
    assert load_or_create_token(path, env={"PORTMESH_TOKEN": "from-env"}) == ("from-env", False)


def test_empty_token_refused(store: FakeStore) -> None:
    with pytest.raises(ValueError):
        create_app(store, "")


# --- 5xx bodies and the logs endpoint (issue 11 item 5) ---


def test_500_carries_a_request_id_not_the_exception(
    store: FakeStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(*_: object) -> int:
        raise RuntimeError("secret detail /run/portmesh/lab/api.token")

    with TestClient(create_app(store, TOKEN), headers=AUTH, raise_server_exceptions=False) as client:
        add_host(client)
        monkeypatch.setattr(store, "add_container", boom)
        with caplog.at_level("ERROR", logger="portmesh.api.app"):
            r = client.post("/v1/containers", json={"name": "a", "host": "h1", "ips": [IP]})
    assert r.status_code == 500
    assert "secret" not in r.text and "RuntimeError" not in r.text and "api.token" not in r.text
    rid = r.json()["request_id"]
    assert rid in r.json()["detail"]["reason"]
    logged = [rec for rec in caplog.records if rid in rec.getMessage()]
    assert logged and logged[0].exc_info is not None  # the traceback is in the log, under the same id


def _with_log(store: FakeStore, client: TestClient, path: Path, state: str = "running") -> None:
    add_host(client)
    add_web(client)
    store.report_container_status("web", ContainerStatus(RunState(state), "ns", 1, "", str(path)))


def test_logs_read_a_runtime_log_and_say_whether_it_runs(store: FakeStore, tmp_path: Path) -> None:
    logs = tmp_path / "h1" / "agent" / "logs"
    logs.mkdir(parents=True)
    (logs / "web.log").write_text("one\ntwo\n")
    with TestClient(create_app(store, TOKEN, log_dirs=[str(tmp_path)]), headers=AUTH) as client:
        _with_log(store, client, logs / "web.log")
        out = client.get("/v1/containers/web/logs").json()
        assert (out["text"], out["offset"], out["running"]) == ("one\ntwo\n", 8, True)
        store.report_container_status("web", ContainerStatus(RunState.EXITED, "ns", None, "", str(logs / "web.log")))
        assert client.get("/v1/containers/web/logs", params={"offset": 8}).json()["running"] is False


@pytest.mark.parametrize("target", ["token", "link.log", "dotdot"])
def test_logs_never_read_outside_a_runtime_log_dir(store: FakeStore, tmp_path: Path, target: str) -> None:
    """Whatever the store says: a secret, a *.log symlink to it, a path climbing out with '..'."""
    allowed = tmp_path / "logs"
    allowed.mkdir()
    secret = tmp_path / "api.token"
    secret.write_text("TOPSECRET\n")
    (allowed / "link.log").symlink_to(secret)
    (tmp_path / "other.log").write_text("TOPSECRET\n")
    path = {"token": secret, "link.log": allowed / "link.log", "dotdot": allowed / ".." / "other.log"}[target]
    with TestClient(create_app(store, TOKEN, log_dirs=[str(allowed)]), headers=AUTH) as client:
        _with_log(store, client, path)
        r = client.get("/v1/containers/web/logs")
        assert_refused(r, 404, "logs")
        assert "TOPSECRET" not in r.text and str(tmp_path) not in r.text
        (allowed / "web.log").write_text("fine\n")  # positive control: the same container, a log inside
        store.report_container_status("web", ContainerStatus(RunState.RUNNING, "ns", 1, "", str(allowed / "web.log")))
        assert client.get("/v1/containers/web/logs").json()["text"] == "fine\n"


def test_engine_log_prefixes_are_dropped() -> None:
    podman = "2026-11-30T10:00:00.123456789+00:00 stdout F hello\n2026-11-30T10:00:01.1+00:00 stderr P par\n"
    podman += "2026-11-30T10:00:01.2+00:00 stderr F tial\n"
    assert plain_lines(podman) == "hello\npartial\n"
    docker = '{"log":"hi there\\n","stream":"stdout","time":"2026-11-30T10:00:00Z"}\n'
    assert plain_lines(docker) == "hi there\n"
    assert plain_lines("plain output\n") == "plain output\n"


# --- Docker habits: env, restart policy, stop --time; status for exec ---


def test_env_restart_and_stop_timeout_are_stored_and_shown(client: TestClient, store: FakeStore) -> None:
    add_host(client)
    body = {"name": "app", "host": "h1", "ips": [IP], "env": ["A=1", "B=x=y", "EMPTY="], "restart": "on-failure"}
    out = client.post("/v1/containers", json=body).json()["container"]
    assert (out["env"], out["restart"], out["stop_timeout"]) == (["A=1", "B=x=y", "EMPTY="], "on-failure", 10)
    c = store.snapshot().containers["app"]
    assert c.env == ("A=1", "B=x=y", "EMPTY=") and c.restart == RestartPolicy.ON_FAILURE
    assert client.post("/v1/containers/app/stop", params={"time": 2}).status_code == 200
    assert store.snapshot().containers["app"].stop_timeout == 2
    assert client.get("/v1/containers/app").json()["running"] is False


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"env": ["A=1", "1BAD=x"]}, "env[1]"),
        ({"env": ["NOEQUALS"]}, "env[0]"),
        ({"env": ["A-B=1"]}, "env[0]"),
        ({"env": ["A=\x00"]}, "env[0]"),
        ({"env": ["A=ok", "B=\udb22"]}, "env[1]"),
        ({"restart": "sometimes"}, "restart"),
        ({"stop_timeout": -1}, "stop_timeout"),
    ],
)
def test_habit_refusals_name_the_field(client: TestClient, store: FakeStore, change: dict[str, Any], field: str) -> None:
    add_host(client)
    writes = store.writes
    body = json.dumps({"name": "app", "host": "h1", "ips": [IP], **change})  # ASCII escapes: a lone surrogate survives
    r = client.post("/v1/containers", content=body, headers={"Content-Type": "application/json"})
    assert_refused(r, 422, field)
    assert store.writes == writes and "app" not in store.snapshot().containers


def test_start_of_an_exited_container_is_a_start_asked_for(client: TestClient, store: FakeStore) -> None:
    """As ``docker start``: the desired state says "running" already, so the start is counted in ``starts``."""
    add_host(client)
    add_web(client)
    store.report_container_status("web", ContainerStatus(RunState.RUNNING, "ns", 7))
    generation = store.snapshot().generation
    client.post("/v1/containers/web/start")  # running: nothing to do, nothing written
    assert store.snapshot().generation == generation and store.snapshot().containers["web"].starts == 0
    store.report_container_status("web", ContainerStatus(RunState.EXITED, "ns", None, "exited (code 0)", exit_code=0))
    client.post("/v1/containers/web/start")
    assert store.snapshot().generation == generation + 1 and store.snapshot().containers["web"].starts == 1


def test_stop_time_out_of_range_is_refused(client: TestClient, store: FakeStore) -> None:
    add_host(client)
    add_web(client)
    writes = store.writes
    assert_refused(client.post("/v1/containers/web/stop", params={"time": -1}), 422, "time")
    assert store.writes == writes


def test_status_answers_what_exec_and_ps_need(client: TestClient, store: FakeStore) -> None:
    add_host(client)
    add_web(client)
    reported = ContainerStatus(RunState.EXITED, "pm-c-web", None, "exited (code 3)", "", exit_code=3, restarts=2, runtime="light")
    store.report_container_status("web", reported)
    status = client.get("/v1/containers/web").json()["status"]
    assert status == {
        "state": "exited",
        "netns": "pm-c-web",
        "pid": None,
        "message": "exited (code 3)",
        "log_path": "",
        "exit_code": 3,
        "restarts": 2,
        "runtime": "light",
    }
