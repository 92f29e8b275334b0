"""The store client against a real ``ovsdb-server`` serving the Portmesh schema (tmp dir, stopped by PID)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from portmesh.model.config import DEFAULT_CONFIG
from portmesh.model.entities import (
    Container,
    ContainerStatus,
    DesiredState,
    Host,
    HostStatus,
    Mapping,
    MappingKey,
    PortBlock,
    Proto,
    RunState,
    mac_for,
)
from portmesh.model.errors import Conflict, InvalidInput, NotFound
from portmesh.store.client import Store, StoreError
from portmesh.store.server import start_server, stop_server

pytestmark = pytest.mark.switch

IP1, IP2 = IPv4Address("203.0.113.10"), IPv4Address("203.0.113.11")


def container(name: str, host: str = "h1", ips: tuple[IPv4Address, ...] = (IP1,), block: int = 32768) -> Container:
    return Container(name, host, mac_for(name), ips, PortBlock(block, 1024), ("sleep", "1 2"), None)


def mapping(port: int, to: str, ip: IPv4Address = IP1, proto: Proto = Proto.TCP) -> Mapping:
    return Mapping(MappingKey(ip, proto, port), to)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    if shutil.which("ovsdb-server") is None:
        pytest.skip("ovsdb-server not installed")
    pid = start_server(tmp_path / "store.db", tmp_path / "store.sock")
    try:
        yield f"unix:{tmp_path / 'store.sock'}"
    finally:
        stop_server(pid)


@pytest.fixture
def store(server: str) -> Iterator[Store]:
    with Store(server, timeout=5) as s:
        yield s


@pytest.fixture
def other(server: str) -> Iterator[Store]:
    """A second client, as another process (API vs. controller) would be."""
    with Store(server, timeout=5) as s:
        yield s


def test_round_trip_to_desired_state(store: Store, other: Store) -> None:
    h1 = Host("h1", 1, IPv4Address("198.18.0.10"))
    h2 = Host("h2", 2**63 - 1)
    a = container("a", ips=(IP1, IP2))
    b = Container("b", "h2", mac_for("b"), (IP1,), PortBlock(33792, 1024), (), "busybox")
    maps = [mapping(80, "a"), mapping(53, "a", IP2, Proto.UDP)]
    store.add_host(h1)
    store.add_host(h2)
    store.add_container(a, maps)
    gen = store.add_container(b, [mapping(443, "b")])
    want = DesiredState(
        generation=gen,
        hosts={"h1": h1, "h2": h2},
        containers={"a": a, "b": b},
        mappings={m.key: m for m in [*maps, mapping(443, "b")]},
    )
    assert store.snapshot() == want  # read-your-writes
    deadline = time.monotonic() + 5
    while other.snapshot() != want and time.monotonic() < deadline:
        time.sleep(0.01)
    assert other.snapshot() == want
    assert store.container_running("a") is True


def test_every_write_bumps_the_generation_once(store: Store) -> None:
    assert store.snapshot().generation == 0
    assert store.add_host(Host("h1", 1)) == 1
    assert store.add_container(container("a"), [mapping(80, "a")]) == 2
    assert store.add_mapping(mapping(81, "a")) == 3
    assert store.remove_mapping(mapping(81, "a").key) == 4
    assert store.set_container_running("a", False) == 5
    assert store.container_running("a") is False
    assert store.remove_container("a") == 6
    assert store.remove_host("h1") == 7
    assert store.snapshot().generation == 7
    # Writes that change nothing return the current generation without bumping it.
    assert store.remove_host("h1", if_exists=True) == 7
    assert store.remove_container("zz", if_exists=True) == 7
    assert store.remove_mapping(mapping(1, "zz").key, if_exists=True) == 7
    assert store.add_host(Host("h1", 1)) == 8
    assert store.add_host(Host("h1", 1), may_exist=True) == 8
    assert store.add_host(Host("h1", 1, IP2), may_exist=True) == 9  # may_exist updates
    assert store.snapshot().hosts["h1"].underlay_ip == IP2


def test_concurrent_writers_get_distinct_generations(store: Store, other: Store) -> None:
    got: list[int] = []
    lock = threading.Lock()

    def write(client: Store, prefix: str, base: int) -> None:
        for i in range(15):
            gen = client.add_host(Host(f"{prefix}{i}", base + i))
            with lock:
                got.append(gen)

    threads = [
        threading.Thread(target=write, args=(c, p, b)) for c, p, b in ((store, "a", 100), (other, "b", 200), (store, "c", 300))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 46))
    assert len(store.snapshot().hosts) == 45


@pytest.mark.parametrize(
    ("write", "field"),
    [
        (lambda s: s.add_host(Host("h1", 99)), "name"),
        (lambda s: s.add_host(Host("h9", 1)), "datapath_id"),  # caught by the server's index
        (lambda s: s.add_container(container("a", block=40960)), "name"),
        (lambda s: s.add_container(Container("x", "h1", mac_for("a"), (IP2,), PortBlock(0, 1))), "mac"),  # index
        (lambda s: s.add_mapping(mapping(80, "a")), "port"),
        (lambda s: s.add_container(container("y"), [mapping(80, "y")]), "port"),
        (lambda s: s.add_container(container("y"), [mapping(90, "y"), mapping(90, "y")]), "port"),
        (lambda s: s.remove_host("h1"), "name"),  # still has containers
    ],
)
def test_conflicts_name_the_field_and_change_nothing(store: Store, write: object, field: str) -> None:
    store.add_host(Host("h1", 1))
    store.add_container(container("a"), [mapping(80, "a")])
    before = store.snapshot()
    with pytest.raises(Conflict) as err:
        write(store)  # type: ignore[operator]
    assert err.value.field == field
    assert store.snapshot() == before


@pytest.mark.parametrize(
    ("write", "error", "field"),
    [
        (lambda s: s.add_container(container("a", host="nohost")), NotFound, "host"),
        (lambda s: s.add_mapping(mapping(80, "ghost")), NotFound, "container"),
        (lambda s: s.remove_container("ghost"), NotFound, "name"),
        (lambda s: s.remove_host("ghost"), NotFound, "name"),
        (lambda s: s.remove_mapping(mapping(80, "x").key), NotFound, "mapping"),
        (lambda s: s.set_container_running("ghost", True), NotFound, "name"),
        (lambda s: s.report_container_status("ghost", ContainerStatus()), NotFound, "name"),
        (lambda s: s.report_switch("ghost", 1, True), NotFound, "host"),
        (lambda s: s.report_agent("ghost", 1), NotFound, "host"),
        (lambda s: s.add_host(Host("big", 2**63)), InvalidInput, "datapath_id"),
        (lambda s: s.add_container(container("z"), [mapping(80, "a")]), InvalidInput, "container"),
    ],
)
def test_missing_rows_and_bad_values(store: Store, write: object, error: type[Exception], field: str) -> None:
    store.add_host(Host("h1", 1))
    before = store.snapshot()
    with pytest.raises(error) as err:
        write(store)  # type: ignore[operator]
    assert err.value.field == field  # type: ignore[attr-defined]
    assert store.snapshot() == before


def test_remove_container_removes_its_mappings(store: Store) -> None:
    store.add_host(Host("h1", 1))
    store.add_container(container("a"), [mapping(80, "a"), mapping(443, "a")])
    store.add_container(container("b", block=33792), [mapping(22, "b")])
    store.add_mapping(mapping(8080, "a"))
    store.remove_container("a")
    state = store.snapshot()
    assert set(state.containers) == {"b"}
    assert list(state.mappings.values()) == [mapping(22, "b")]
    store.add_container(container("a"), [mapping(80, "a")])  # the keys are free again


def test_subscribe_fires_on_another_clients_write(store: Store, other: Store) -> None:
    seen: list[int] = []
    fired = threading.Event()

    def on_change() -> None:
        seen.append(other.snapshot().generation)  # reading from the callback is allowed
        fired.set()

    other.subscribe(on_change)
    gen = store.add_host(Host("h1", 1))
    assert fired.wait(2), "no notification within 2 s"
    deadline = time.monotonic() + 2
    while gen not in seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gen in seen


def test_writing_from_a_callback_is_refused_not_deadlocked(store: Store) -> None:
    errors: list[BaseException] = []
    done = threading.Event()

    def on_change() -> None:
        try:
            store.add_host(Host("cb", 7), may_exist=True)
        except StoreError as exc:
            errors.append(exc)
        done.set()

    store.subscribe(on_change)
    store.add_host(Host("h1", 1))
    assert done.wait(2)
    assert errors and "cb" not in store.snapshot().hosts


def test_status_reports_do_not_bump_generation(store: Store, other: Store) -> None:
    gen = store.add_host(Host("h1", 1))
    gen = store.add_container(container("a"))
    assert store.container_status("a") is None  # not reported yet
    assert store.host_status("h1") == HostStatus()
    status = ContainerStatus(RunState.RUNNING, "pmc-a", 4242, "")
    other.report_container_status("a", status)
    other.report_switch("h1", gen, True)
    other.report_agent("h1", gen - 1)
    other.report_container_status("a", status)  # unchanged: fine
    assert other.container_status("a") == status
    deadline = time.monotonic() + 2
    while store.host_status("h1") != HostStatus(gen, gen - 1, True) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.host_status("h1") == HostStatus(gen, gen - 1, True)
    assert store.container_status("a") == status
    assert store.container_statuses() == {"a": status}
    assert store.snapshot().generation == gen
    # Desired-state rewrites leave the status columns alone.
    store.add_host(Host("h1", 1, IP1), may_exist=True)
    assert store.host_status("h1") == HostStatus(gen, gen - 1, True)
    # Lenient reads for names that are gone.
    assert store.container_status("ghost") is None
    assert store.container_running("ghost") is False
    assert store.host_status("ghost") == HostStatus()


def test_a_store_limited_to_some_tables_reads_and_reports_without_the_rest(store: Store, server: str) -> None:
    """What the agent runs: no Mapping replica, yet hosts, containers, generation and its reports work."""
    store.add_host(Host("h1", 1))
    generation = store.add_container(container("c1"), [mapping(80, "c1"), mapping(81, "c1")])
    with Store(server, timeout=5, tables=("Global", "Host", "Container")) as agent_view:
        state = agent_view.snapshot()
        assert state.generation == generation
        assert set(state.hosts) == {"h1"} and set(state.containers) == {"c1"}
        assert state.mappings == {}, "the Mapping table is not replicated"
        assert agent_view.running_containers() == {"c1"}
        agent_view.report_agent("h1", generation)
        agent_view.report_container_status("c1", ContainerStatus(RunState.RUNNING, "ns", 7, ""))
    deadline = time.monotonic() + 5
    while store.host_status("h1").agent_generation != generation:
        assert time.monotonic() < deadline, "the limited client's report never arrived"
        time.sleep(0.01)
    assert store.snapshot().generation == generation, "reports do not bump the generation"
    assert len(store.snapshot().mappings) == 2, "the other client still sees every mapping"


def test_start_fails_fast_without_a_server(tmp_path: Path) -> None:
    s = Store(f"unix:{tmp_path / 'none.sock'}", timeout=1)
    with pytest.raises(StoreError):
        s.start(timeout=0.5)
    s.close()


def test_serve_command_runs_the_server_in_the_foreground(tmp_path: Path) -> None:
    if shutil.which("ovsdb-server") is None:
        pytest.skip("ovsdb-server not installed")
    sock = tmp_path / "s.sock"
    cmd = [
        sys.executable,
        "-m",
        "portmesh.store",
        "serve",
        "--db",
        str(tmp_path / "s.db"),
        "--socket",
        str(sock),
        "--pidfile",
        str(tmp_path / "s.pid"),
    ]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "s.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert int((tmp_path / "s.pid").read_text()) == proc.pid  # exec: the PID we hold is the server's
        with Store(f"unix:{sock}", timeout=5) as s:
            assert s.add_host(Host("h1", 1)) == 1
    finally:
        proc.terminate()
        proc.wait(5)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _role(ctl: Path) -> str:
    out = subprocess.run(["ovs-appctl", "-t", str(ctl), "cluster/status", "Portmesh"], capture_output=True, text=True)
    return next((line.split(":", 1)[1].strip() for line in out.stdout.splitlines() if line.startswith("Role:")), "")


def make_cluster_dbs(tmp_path: Path) -> list[Path]:
    """Three members' database files, made with the store's own entry points (as docs/deploy.md does)."""
    addrs = [f"tcp:127.0.0.1:{_free_port()}" for _ in range(3)]
    dbs = [tmp_path / f"m{i}.db" for i in range(3)]
    store = [sys.executable, "-m", "portmesh.store"]
    subprocess.run([*store, "create-cluster", "--db", str(dbs[0]), "--local", addrs[0]], check=True)
    for i in (1, 2):
        remotes = ",".join(addrs[:i])
        subprocess.run([*store, "join-cluster", "--db", str(dbs[i]), "--local", addrs[i], "--remote", remotes], check=True)
    return dbs


@contextlib.contextmanager
def raft_cluster(tmp_path: Path) -> Iterator[tuple[str, dict[int, int]]]:
    """Three ovsdb-server members on loopback: the comma-separated remote and member → PID (stopped on exit)."""
    if shutil.which("ovsdb-server") is None:
        pytest.skip("ovsdb-server not installed")
    dbs = make_cluster_dbs(tmp_path)
    pids: dict[int, int] = {}
    try:
        for i in range(3):
            pids[i] = start_server(dbs[i], tmp_path / f"m{i}.sock", create=False)
        yield ",".join(f"unix:{tmp_path / f'm{i}.sock'}" for i in range(3)), pids
    finally:
        for pid in pids.values():
            stop_server(pid)


def kill_leader(tmp_path: Path, pids: dict[int, int]) -> None:
    """SIGKILL the cluster's leader (a crash: no graceful leadership transfer)."""
    leader = next(i for i in range(3) if _role(tmp_path / f"m{i}.ctl") == "leader")
    pid = pids.pop(leader)
    os.kill(pid, signal.SIGKILL)
    stop_server(pid)


def test_raft_cluster_survives_a_leader_kill(tmp_path: Path) -> None:
    """Three members on loopback; kill the leader; the next write waits for the new leader, then succeeds."""
    with raft_cluster(tmp_path) as (remote, pids), Store(remote, timeout=15) as s:
        assert s.add_host(Host("h1", 1)) == 1
        kill_leader(tmp_path, pids)
        t0 = time.monotonic()
        assert s.add_host(Host("h2", 2)) == 2
        assert time.monotonic() - t0 < 8, "failover took too long (reconnect backoff not capped?)"
        assert set(s.snapshot().hosts) == {"h1", "h2"}
        assert s.snapshot().config == DEFAULT_CONFIG  # create-cluster seeded the Global row
