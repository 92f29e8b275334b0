"""The store's incrementally kept desired state equals a full rebuild from the IDL cache, whatever happened.

A writer and an observer (another client, as the controller is) run a random
sequence of writes against a real ``ovsdb-server``: every kind of desired-state
write, status reports, and writes that fail (conflicts, missing rows). After
each step both snapshots must equal the state rebuilt from scratch from the
committed rows, and the state the test expects. Then the server restarts while
the database file is changed offline, so the client reloads its whole cache
(no row notices say what went meanwhile).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from portmesh.model.entities import (
    Container,
    ContainerStatus,
    DesiredState,
    Host,
    Mapping,
    MappingKey,
    PortBlock,
    Proto,
    RunState,
    mac_for,
)
from portmesh.model.errors import ModelError
from portmesh.store import rows as R
from portmesh.store.client import Store
from portmesh.store.mirror import Committed
from portmesh.store.server import start_server, stop_server

pytestmark = pytest.mark.switch


IPS = [IPv4Address("203.0.113.1"), IPv4Address("203.0.113.2"), IPv4Address("203.0.113.3")]


def rebuilt(store: Store) -> DesiredState:
    """The desired state built from scratch from the committed rows of the IDL cache (the old way)."""
    with store._lock():
        tables = store._idl.tables
        committed = {name: [Committed(r) for r in t.rows.values() if r._data is not None] for name, t in tables.items()}
        hosts = (R.host_from_row(r) for r in committed["Host"])
        containers = (R.container_from_row(r) for r in committed["Container"])
        mappings = (R.mapping_from_row(r) for r in committed["Mapping"])
        generation = int(committed["Global"][0].generation) if committed["Global"] else 0
    return DesiredState(generation, {h.name: h for h in hosts}, {c.name: c for c in containers},
                        {m.key: m for m in mappings})


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture


def server(tmp_path: Path) -> Iterator[tuple[Path, Path, list[int]]]:
    if shutil.which("ovsdb-server") is None:
        pytest.skip("ovsdb-server not installed")
    db, sock = tmp_path / "store.db", tmp_path / "store.sock"
    pids = [start_server(db, sock)]
    try:
        yield db, sock, pids
    finally:
        for pid in pids:
            stop_server(pid)


class Model:
    """What the desired state should be after the writes that succeeded."""

    def __init__(self) -> None:
        self.hosts: dict[str, Host] = {}
        self.containers: dict[str, Container] = {}
        self.mappings: dict[MappingKey, Mapping] = {}

    def same(self, state: DesiredState) -> bool:
        return (state.hosts, state.containers, state.mappings) == (self.hosts, self.containers, self.mappings)


def random_step(rng: random.Random, store: Store, model: Model, step: int) -> None:
    """One random write (or status report) through ``store``, mirrored in ``model`` if it succeeded."""
    hosts, containers = sorted(model.hosts), sorted(model.containers)
    op = rng.randrange(10)
    try:
        if op == 0 or not hosts:
            name = rng.choice(["h1", "h2", "h3"])
            host = Host(name, rng.randrange(1, 4), rng.choice([None, IPv4Address("198.18.0.10")]))
            store.add_host(host, may_exist=True)
            model.hosts[name] = host
        elif op == 1:
            name = rng.choice(hosts)
            store.remove_host(name)
            del model.hosts[name]
        elif op in (2, 3) or not containers:
            name = f"c{step}"
            ips = tuple(sorted(rng.sample(IPS, rng.randrange(1, 3))))
            c = Container(name, rng.choice(hosts), mac_for(name), ips, PortBlock(32768 + 1024 * (step % 32), 1024))
            ms = [Mapping(MappingKey(rng.choice(ips), rng.choice(list(Proto)), rng.randrange(1, 40)), name)
                  for _ in range(rng.randrange(0, 6))]
            ms = list({m.key: m for m in ms}.values())
            store.add_container(c, ms)
            model.containers[name] = c
            model.mappings.update((m.key, m) for m in ms)
        elif op == 4:
            name = rng.choice(containers)
            store.remove_container(name)
            del model.containers[name]
            model.mappings = {k: m for k, m in model.mappings.items() if m.container != name}
        elif op == 5:
            m = Mapping(MappingKey(rng.choice(IPS), rng.choice(list(Proto)), rng.randrange(1, 40)),
                        rng.choice(containers))
            store.add_mapping(m)  # a taken key: Conflict, nothing changes
            model.mappings[m.key] = m
        elif op == 6 and model.mappings:
            key = rng.choice(sorted(model.mappings))
            store.remove_mapping(key)
            del model.mappings[key]
        elif op == 7:
            store.set_container_running(rng.choice(containers), rng.random() < 0.5)
        elif op == 8:
            store.report_container_status(rng.choice(containers), ContainerStatus(RunState.RUNNING, "ns", step, ""))
        else:
            store.report_switch(rng.choice(hosts), step, rng.random() < 0.5)
            store.report_agent(rng.choice(hosts), step)
    except ModelError:
        pass  # refused (Conflict, NotFound): the model is unchanged, so must the store be


@pytest.mark.parametrize("seed", [1, 2, 3])


def test_snapshot_equals_a_full_rebuild_after_random_writes(server: tuple[Path, Path, list[int]], seed: int) -> None:
    _, sock, _ = server
    rng = random.Random(seed)
    model = Model()
    with Store(f"unix:{sock}", timeout=5) as writer, Store(f"unix:{sock}", timeout=5) as observer:
        for step in range(150):
            random_step(rng, writer, model, step)
            state = writer.snapshot()  # read-your-writes: the writer is current when the write returns
            assert state == rebuilt(writer)
            assert model.same(state), f"step {step}"
            generation = state.generation
            wait_until(lambda: observer.snapshot().generation == generation)  # noqa: B023 (called right here)
            assert observer.snapshot() == rebuilt(observer) == state
        assert model.mappings, "the sequence should leave some mappings behind"


def change_while_down(db: Path, sock: Path, pids: list[int], before: DesiredState) -> list[MappingKey]:
    """Stop the server, delete half the mappings and add host "offline" in the file, start it again.

    The clients saw none of it happen: they must find out from the reload. Returns the deleted keys.
    """
    stop_server(pids.pop())
    gone = sorted(before.mappings)[: len(before.mappings) // 2]
    ops: list[dict[str, object]] = [
        {"op": "delete", "table": "Mapping",
         "where": [["public_ip", "==", str(k.public_ip)], ["proto", "==", k.proto.value], ["port", "==", k.port]]}
        for k in gone
    ]
    ops.append({"op": "insert", "table": "Host", "row": {"name": "offline", "datapath_id": 99}})
    subprocess.run(["ovsdb-tool", "transact", str(db), json.dumps(["Portmesh", *ops])], check=True, capture_output=True)
    pids.append(start_server(db, sock, create=False))
    return gone


def test_snapshot_follows_a_reload_after_the_server_restarts(server: tuple[Path, Path, list[int]]) -> None:
    """Changes made while the client was away come back as a full reload, deletions included."""
    db, sock, pids = server
    rng = random.Random(7)
    model = Model()
    with Store(f"unix:{sock}", timeout=5) as store:
        for step in range(60):
            random_step(rng, store, model, step)
        before = store.snapshot()
        assert before.mappings
        reloads: list[int] = []
        rebuild = store._mirror.rebuild

        def counted(tables: dict[str, Iterable[R.Row]]) -> None:
            reloads.append(1)
            rebuild(tables)

        store._mirror.rebuild = counted  # type: ignore[method-assign]
        gone = change_while_down(db, sock, pids, before)
        wait_until(lambda: "offline" in store.snapshot().hosts, timeout=15)
        state = store.snapshot()
        assert state == rebuilt(store)
        assert set(state.mappings) == set(before.mappings) - set(gone)
        assert reloads, "the restarted server should have made the client reload its cache"
        # and it keeps following row by row afterwards
        random_step(rng, store, model, 1000)
        store.remove_host("offline")
        assert store.snapshot() == rebuilt(store)
