"""Container lifecycle in the API (issue 10 items 1, 5, 6): per-object waiting, no wedge by a broken
container, a failed create changes nothing, generated names and hosts, idempotent map add."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from portmesh.api.app import create_app
from portmesh.model.entities import ContainerStatus, DesiredState, Host, RunState
from portmesh.model.errors import InvalidInput, NotFound
from portmesh.model.names import generate_name
from portmesh.model.validation import NAME_RE, choose_host, parse_image
from tests.unit.fakes import FakeStore

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
IP = "203.0.113.47"
NO_IMAGE = "image 'nosuch/image:latest' is not in the engine's local store"


@pytest.fixture
def store() -> FakeStore:
    return FakeStore(auto_converge=True)


@pytest.fixture
def client(store: FakeStore) -> Iterator[TestClient]:
    with TestClient(create_app(store, TOKEN, wait_timeout=2.0)) as c:
        assert c.post("/v1/hosts", json={"name": "h1"}, headers=AUTH).status_code == 201
        yield c


def run(client: TestClient, wait: bool = True, **body: Any) -> Any:
    payload = {"name": "x", "host": "h1", "ips": [IP], "ports": [{"port": 80}], "command": ["sleep", "100"], **body}
    return client.post(f"/v1/containers?wait={str(wait).lower()}", json=payload, headers=AUTH)


# --- pure parts ---


def test_generated_names_are_docker_style_valid_and_free() -> None:
    seq = itertools.cycle([0, 0, 0, 0, 1, 2])
    name = generate_name(set(), rng=lambda n: next(seq) % n)
    assert name == "agile_baran" and NAME_RE.fullmatch(name)
    taken = {"agile_baran"}
    assert generate_name(taken, rng=lambda n: next(seq) % n) not in taken
    assert all(NAME_RE.fullmatch(generate_name(set())) for _ in range(200))


def test_generated_name_gets_a_digit_after_many_collisions() -> None:
    assert generate_name({"agile_baran"}, rng=lambda n: 0, attempts=3) == "agile_baran0"


@pytest.mark.parametrize(
    "ref", ["busybox", "portmesh/busybox:latest", "nosuch/image:latest", "localhost:5000/a/b:v1", "a/b@sha256:" + "0" * 64]
)
def test_well_formed_image_references(ref: str) -> None:
    assert parse_image(ref) == ref


@pytest.mark.parametrize("ref", ["", " ", "Busybox", "a b", "x:", "/x", "x/", "-x", "x:bad tag", "x@sha256:abc", "x:t\u00e9"])
def test_malformed_image_references_name_the_field(ref: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_image(ref)
    assert err.value.field == "image"


def test_host_choice_is_fewest_containers_then_name() -> None:
    with pytest.raises(NotFound):
        choose_host(DesiredState())
    state = DesiredState(hosts={"h2": Host("h2", 2), "h1": Host("h1", 1)})
    assert choose_host(state) == "h1"


# --- the API ---


def test_invalid_image_reference_is_refused_up_front(client: TestClient, store: FakeStore) -> None:
    writes = store.writes
    r = run(client, image="Not A/Ref")
    assert r.status_code == 422 and r.json()["detail"]["field"] == "image", r.text
    assert store.writes == writes and "x" not in store.snapshot().containers


def test_failed_first_start_rolls_the_create_back(client: TestClient, store: FakeStore) -> None:
    store._status["x"] = ContainerStatus(RunState.ERROR, message=NO_IMAGE)  # what the agent will report
    r = run(client, image="nosuch/image:latest")
    assert r.status_code == 404, r.text
    assert r.json()["detail"]["field"] == "image" and "not in the engine" in r.json()["detail"]["reason"]
    state = store.snapshot()
    assert "x" not in state.containers and not state.mappings  # no row, no block, no mapping
    # Positive control: the same request with an image that exists is created and reachable.
    ok = run(client, image="portmesh/busybox:latest")
    assert ok.status_code == 201, ok.text
    assert [m["port"] for m in ok.json()["container"]["mappings"]] == [80]


def test_unexecutable_command_is_refused_for_command(client: TestClient, store: FakeStore) -> None:
    store._status["x"] = ContainerStatus(RunState.ERROR, message="cannot start '/nope': [Errno 2] No such file")
    r = run(client, command=["/nope"])
    assert r.status_code == 422 and r.json()["detail"]["field"] == "command", r.text
    assert "x" not in store.snapshot().containers


def test_without_wait_a_failing_container_stays_in_error(client: TestClient, store: FakeStore) -> None:
    store._status["x"] = ContainerStatus(RunState.ERROR, message=NO_IMAGE)
    r = run(client, wait=False, image="nosuch/image:latest")
    assert r.status_code == 201, r.text
    assert r.json()["container"]["status"] == {**r.json()["container"]["status"], "state": "error", "message": NO_IMAGE}


def test_exited_at_once_is_created_and_says_so(client: TestClient, store: FakeStore) -> None:
    store._status["x"] = ContainerStatus(RunState.EXITED, message="exited (code 1)")
    r = run(client, command=["false"])
    assert r.status_code == 201, r.text
    assert r.json()["container"]["status"]["state"] == "exited"


def test_broken_container_never_wedges_other_writes(store: FakeStore) -> None:
    """The switch reports its generation naming the port-less container; other writes answer at once."""
    store.auto_converge = False
    with TestClient(create_app(store, TOKEN, wait_timeout=1.0)) as client:
        client.post("/v1/hosts", json={"name": "h1"}, headers=AUTH)
        assert run(client, wait=False, image="nosuch/image:latest").status_code == 201
        store.report_container_status("x", ContainerStatus(RunState.ERROR, message=NO_IMAGE))
        r = run(client, wait=False, name="web", ips=["203.0.113.48"])
        gen = r.json()["generation"]

        def agents_report(web: RunState) -> None:
            store.report_container_status("web", ContainerStatus(web))
            store.report_agent("h1", gen)
            store.report_switch("h1", gen, True, {"x"} | ({"web"} if web == RunState.PENDING else set()))

        agents_report(RunState.RUNNING)
        status = client.get("/v1/status", headers=AUTH).json()
        assert status["converged"] is True, status  # all that can be realised is realised
        assert [(p["name"], p["state"], p["message"]) for p in status["problems"]] == [("x", "error", NO_IMAGE)]
        # An unrelated write on the same host completes (per object), well within the timeout.
        m = client.post("/v1/mappings?wait=true", json={"public_ip": "203.0.113.48", "port": 8080, "container": "web"},
                        headers=AUTH)
        assert m.status_code == 504  # not yet reported: the generation moved on; positive control below
        store.report_agent("h1", m.json()["generation"])
        store.report_switch("h1", m.json()["generation"], True, {"x"})
        again = client.post("/v1/mappings?wait=true", json={"public_ip": "203.0.113.48", "port": 8080, "container": "web"},
                            headers=AUTH)
        assert again.status_code == 200 and again.json()["converged"] is True, again.text
        # A container that is still starting (no port yet, not in error) is not up to date.
        store.report_switch("h1", m.json()["generation"], True, {"x", "web"})
        status = client.get("/v1/status", headers=AUTH).json()
        assert status["converged"] is False and status["hosts"][0]["waiting"] == ["web"], status


def test_run_without_name_or_host_generates_and_says(client: TestClient, store: FakeStore) -> None:
    client.post("/v1/hosts", json={"name": "h0"}, headers=AUTH)
    r = client.post("/v1/containers?wait=true", json={"ips": [IP], "command": ["python3", "-m", "http.server"]},
                    headers=AUTH)
    assert r.status_code == 201, r.text
    out = r.json()
    name = out["container"]["name"]
    assert NAME_RE.fullmatch(name) and "_" in name and not name.startswith("python3")
    assert out["container"]["host"] == "h0"  # both empty: ties by name
    assert any(name in n for n in out["notes"]) and any("h0" in n and "fewest" in n for n in out["notes"])
    r2 = client.post("/v1/containers", json={"ips": ["203.0.113.49"]}, headers=AUTH).json()
    assert r2["container"]["host"] == "h1"  # h0 holds one now
    named = run(client, name="given")
    assert named.json()["notes"] == []


def test_map_add_is_idempotent_but_never_takes_over(client: TestClient, store: FakeStore) -> None:
    assert run(client).status_code == 201
    assert run(client, name="y", ports=[]).status_code == 201
    body = {"public_ip": IP, "port": 8080, "container": "x"}
    first = client.post("/v1/mappings?wait=true", json=body, headers=AUTH)
    assert first.status_code == 201, first.text
    writes = store.writes
    again = client.post("/v1/mappings?wait=true", json=body, headers=AUTH)
    assert again.status_code == 200 and again.json()["mapping"] == first.json()["mapping"]
    assert store.writes == writes
    other = client.post("/v1/mappings", json={**body, "container": "y"}, headers=AUTH)
    assert other.status_code == 409 and other.json()["detail"]["field"] == "port"


def test_start_answers_with_the_real_state(client: TestClient, store: FakeStore) -> None:
    store._status["x"] = ContainerStatus(RunState.ERROR, message=NO_IMAGE)
    assert run(client, wait=False, image="nosuch/image:latest").status_code == 201
    r = client.post("/v1/containers/x/start?wait=true", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["container"]["status"]["state"] == "error" and r.json()["container"]["status"]["message"] == NO_IMAGE


# --- the CLI's run and start (HTTP to a real API over the fake store) ---


@pytest.fixture
def cli_server(store: FakeStore) -> Iterator[Any]:
    from tests.unit.test_cli import Server

    store.add_host(Host("h1", 1))
    with Server(store) as server:
        yield server


def cli(server: Any, *args: str) -> Any:
    from typer.testing import CliRunner

    from portmesh.cli import app as cli_app
    from tests.unit.test_cli import TOKEN as CLI_TOKEN

    env = {"PORTMESH_API": server.url, "PORTMESH_TOKEN": CLI_TOKEN, "PORTMESH_TOKEN_FILE": "/nonexistent"}
    return CliRunner().invoke(cli_app.app, list(args), env=env)


def test_cli_run_without_name_never_takes_the_command_word(cli_server: Any, store: FakeStore) -> None:
    r = cli(cli_server, "run", "--ip", IP, "-p", "80/tcp", "--", "sleep", "100")
    assert r.exit_code == 0, r.output
    (c,) = store.snapshot().containers.values()
    assert c.name != "sleep" and "_" in c.name and c.command == ("sleep", "100") and c.host == "h1"
    assert f"name {c.name!r} generated" in r.stdout and "chosen" in r.stdout
    # Positive control: a NAME before "--" is the name, and the words after it the command.
    named = cli(cli_server, "run", "web", "--ip", "203.0.113.48", "--", "sleep", "100")
    assert named.exit_code == 0, named.output
    assert store.snapshot().containers["web"].command == ("sleep", "100")


def test_cli_run_of_a_failing_image_exits_1_and_leaves_nothing(cli_server: Any, store: FakeStore) -> None:
    store._status["bad"] = ContainerStatus(RunState.ERROR, message=NO_IMAGE)
    r = cli(cli_server, "run", "bad", "--ip", IP, "-p", "80/tcp", "--image", "nosuch/image:latest", "--", "sleep", "100")
    assert r.exit_code == 1 and "image:" in r.stderr and "not in the engine" in r.stderr, r.output
    assert "bad" not in store.snapshot().containers


def test_cli_run_that_exits_at_once_says_so(cli_server: Any, store: FakeStore) -> None:
    store._status["f"] = ContainerStatus(RunState.EXITED, message="process exited")
    r = cli(cli_server, "run", "f", "--ip", IP, "--", "false")
    assert r.exit_code == 1 and "f created on h1" in r.stdout and "f was created but" in r.stderr, r.output
    assert "f" in store.snapshot().containers  # kept, as Docker keeps an exited container


def test_cli_start_of_a_container_in_error_fails_with_the_reason(cli_server: Any, store: FakeStore) -> None:
    store._status["bad"] = ContainerStatus(RunState.ERROR, message=NO_IMAGE)
    assert cli(cli_server, "run", "bad", "--ip", IP, "--no-wait", "--image", "nosuch/image:latest").exit_code == 0
    r = cli(cli_server, "start", "bad")
    assert r.exit_code == 1 and "did not start" in r.stderr and NO_IMAGE in r.stderr and "started" not in r.stdout, r.output
    # Positive control: a running container starts with exit status 0.
    assert cli(cli_server, "run", "ok", "--ip", "203.0.113.48", "--", "sleep", "9").exit_code == 0
    ok = cli(cli_server, "start", "ok")
    assert ok.exit_code == 0 and "ok started" in ok.stdout, ok.output


def test_cli_status_lists_containers_that_do_not_run(cli_server: Any, store: FakeStore) -> None:
    store._status["bad"] = ContainerStatus(RunState.ERROR, message=NO_IMAGE)
    assert cli(cli_server, "run", "bad", "--ip", IP, "--no-wait", "--image", "nosuch/image:latest").exit_code == 0
    assert cli(cli_server, "run", "ok", "--ip", "203.0.113.48", "--", "sleep", "9").exit_code == 0
    r = cli(cli_server, "status")
    assert r.exit_code == 0 and "converged" in r.stdout, r.output
    assert f"not running: bad on h1: error: {NO_IMAGE}" in r.stdout and "not running: ok" not in r.stdout


def test_a_wait_that_times_out_says_what_it_waits_for(store: FakeStore) -> None:
    store.auto_converge = False
    with TestClient(create_app(store, TOKEN, wait_timeout=0.3)) as client:
        client.post("/v1/hosts", json={"name": "h1"}, headers=AUTH)
        r = run(client)
        assert r.status_code == 504 and "hosts h1" in r.json()["detail"]["reason"], r.text
        gen = store.snapshot().generation
        store.report_agent("h1", gen)
        store.report_switch("h1", gen, True, {"x"})  # host caught up, the container has no port yet
        store.report_container_status("x", ContainerStatus(RunState.RUNNING))
        same = {"public_ip": IP, "port": 80, "container": "x"}  # exists already: no write, same generation
        r = client.post("/v1/mappings?wait=true", json=same, headers=AUTH)
        assert r.status_code == 504 and "containers x not reported live" in r.json()["detail"]["reason"], r.text
        store.report_switch("h1", gen, True, set())  # positive control: its port appears
        r = client.post("/v1/mappings?wait=true", json=same, headers=AUTH)
        assert r.status_code == 200 and r.json()["converged"] is True, r.text
