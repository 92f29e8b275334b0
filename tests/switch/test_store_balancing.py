"""Issue 15 on a real ovsdb-server: schema 1.6.0's Mapping columns (backends with weights, allow/deny,
the health check, the agents' backend_health, the controller's counters) through every reader, the
changes of a mapping under concurrent writers, agents' health reports, the master's counters, and a
container removed from load-balanced mappings."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
from ovs.db import idl as ovs_idl

from portmesh.model.entities import (
    Backend,
    HealthCheck,
    HealthKind,
    Host,
    Mapping,
    MappingCounters,
    MappingKey,
    Proto,
)
from portmesh.model.errors import Conflict, InvalidInput, NotFound
from portmesh.model.validation import with_backend, without_backend
from portmesh.store.client import Store
from portmesh.store.engine import StoreError
from portmesh.store.reader import StateReader
from portmesh.store.rows import schema_path
from portmesh.store.server import create_db, start_server, stop_server
from tests.switch.test_store import IP1, container, mapping, server
from tests.switch.test_store_mirror import wait_until

__all__ = ["server"]  # the fixture, re-used

KEY = MappingKey(IP1, Proto.TCP, 80)
LOCK = "portmesh_test_counters"
CHECK = HealthCheck(HealthKind.HTTP, 8080, "/healthz", 204, 0.5, 0.25, 3)


def balanced(*names: str, **weights: int) -> Mapping:
    return Mapping(KEY, names[0], backends=tuple(Backend(n, weights.get(n, 1)) for n in names))


@pytest.fixture
def api(server: str) -> Iterator[Store]:
    """h1 with a1, a2, a3; h2 with b1, b2 (blocks apart, all on IP1)."""
    with Store(server, timeout=10) as s:
        s.add_host(Host("h1", 1))
        s.add_host(Host("h2", 2))
        for i, (name, host) in enumerate([("a1", "h1"), ("a2", "h1"), ("a3", "h1"), ("b1", "h2"), ("b2", "h2")]):
            s.add_container(container(name, host, block=32768 + 1024 * i))
        yield s


def full_mapping() -> Mapping:
    return Mapping(
        KEY, "a1",
        backends=(Backend("a1", 1), Backend("a2", 3), Backend("b1", 2)),
        allow=(IPv4Network("198.51.100.0/25"), IPv4Network("203.0.113.0/24")),
        deny=(IPv4Network("198.51.100.7/32"),),
        health=CHECK,
    )


def test_every_field_round_trips_through_every_reader(api: Store, server: str) -> None:
    plain = mapping(81, "a1")
    heavy = Mapping(MappingKey(IP1, Proto.UDP, 82), "b2", backends=(Backend("b2", 7),))  # one backend, weight 7
    tcp_check = Mapping(MappingKey(IP1, Proto.TCP, 83), "a3", health=HealthCheck())  # defaults, port 0
    for m in (full_mapping(), plain, heavy, tcp_check):
        api.add_mapping(m)
    want = {m.key: m for m in (full_mapping(), plain, heavy, tcp_check)}
    with Store(server, timeout=10) as other, StateReader(server, timeout=10) as reader:
        wait_until(lambda: reader.snapshot().generation == api.snapshot().generation)
        for view in (api.snapshot(), other.snapshot(), reader.snapshot()):
            assert view.mappings == want
            assert view.mappings[KEY].balanced and view.mappings[KEY].filtered
            assert not view.mappings[plain.key].balanced and view.mappings[plain.key].health is None
            assert view.mappings_of("a2") == [full_mapping()]
    assert api.mapping_health(KEY) == {} and api.mapping_counters(KEY) == MappingCounters()


def test_backends_after_the_first_come_back_sorted_by_name(api: Store) -> None:
    """The column is a map (no order): the first backend is ``container``, the rest by name."""
    api.add_mapping(balanced("a2", "b1", "a1"))
    assert api.snapshot().mappings[KEY].names == ("a2", "a1", "b1")


def test_add_mapping_verifies_every_backend(api: Store) -> None:
    generation = api.snapshot().generation
    with pytest.raises(NotFound) as err:
        api.add_mapping(balanced("a1", "ghost"))
    assert err.value.field == "backends"
    with pytest.raises(InvalidInput):
        api.add_mapping(Mapping(KEY, "a1", backends=(Backend("a1"), Backend("a2"), Backend("a2"))))
    assert api.snapshot().generation == generation and KEY not in api.snapshot().mappings
    api.add_mapping(balanced("a1", "a2"))  # positive control
    assert api.snapshot().mappings[KEY].names == ("a1", "a2")


def test_update_mapping_changes_backends_weights_policy_and_health(api: Store) -> None:
    api.add_mapping(mapping(80, "a1"))
    g1 = api.update_mapping(KEY, lambda m: with_backend(api.snapshot(), m, "b1", 2))
    assert api.snapshot().mappings[KEY].backends == (Backend("a1"), Backend("b1", 2))
    g2 = api.update_mapping(KEY, lambda m: replace(m, allow=(IPv4Network("198.51.100.0/24"),), health=CHECK))
    assert g2 == g1 + 1
    got = api.snapshot().mappings[KEY]
    assert got.allow == (IPv4Network("198.51.100.0/24"),) and got.health == CHECK and got.balanced
    # Unchanged: nothing written, no generation.
    assert api.update_mapping(KEY, lambda m: m) == g2 == api.snapshot().generation
    # The first backend removed: the next one becomes the mapping's container.
    api.update_mapping(KEY, lambda m: without_backend(m, "a1"))
    assert api.snapshot().mappings[KEY] == Mapping(
        KEY, "b1", backends=(Backend("b1", 2),), allow=(IPv4Network("198.51.100.0/24"),), health=CHECK
    )
    with pytest.raises(Conflict):  # the last backend: remove the mapping instead
        api.update_mapping(KEY, lambda m: without_backend(m, "b1"))
    with pytest.raises(NotFound) as err:
        api.update_mapping(MappingKey(IP1, Proto.TCP, 9), lambda m: m)
    assert err.value.field == "mapping"
    with pytest.raises(NotFound) as err:  # a new backend must exist
        api.update_mapping(KEY, lambda m: replace(m, backends=(*m.backends, Backend("ghost"))))
    assert err.value.field == "container"
    with pytest.raises(InvalidInput):
        api.update_mapping(KEY, lambda m: replace(m, key=MappingKey(IP1, Proto.TCP, 81)))
    assert api.snapshot().mappings[KEY].names == ("b1",)  # none of the refused changes went through


def test_twenty_concurrent_backend_adds_from_two_clients_are_all_kept(api: Store, server: str) -> None:
    names = [f"n{i}" for i in range(20)]
    for i, name in enumerate(names):
        api.add_container(container(name, "h1" if i % 2 else "h2", block=32768 + 1024 * (5 + i)))
    api.add_mapping(mapping(80, "a1"))
    errors: list[BaseException] = []
    with Store(server, timeout=20) as other:
        clients = [api, other]
        start = threading.Barrier(len(names))

        def add(i: int) -> None:
            client = clients[i % 2]
            start.wait()
            try:
                client.update_mapping(KEY, lambda m: with_backend(client.snapshot(), m, names[i]))
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=add, args=(i,)) for i in range(len(names))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        wait_until(lambda: other.snapshot().mappings[KEY] == api.snapshot().mappings[KEY])
    got = api.snapshot().mappings[KEY]
    assert got.container == "a1" and sorted(got.names[1:]) == sorted(names)


def test_two_agents_report_health_on_one_mapping_and_both_are_kept(api: Store, server: str) -> None:
    api.add_mapping(replace(balanced("a1", "a2", "b1"), health=CHECK))
    api.add_mapping(mapping(81, "a1"))  # no check: never reaches an agent
    agent_tables = ("Global", "Host", "Container")  # as the agent's __main__ passes them: Mapping comes anyway
    with Store(server, timeout=10, host="h1") as h1, Store(server, timeout=10, tables=agent_tables, host="h2") as h2:
        # The agent's view holds the checked mapping with its backends, not the plain one.
        for agent in (h1, h2):
            assert set(agent.snapshot().mappings) == {KEY}
            assert agent.snapshot().mappings[KEY].names == ("a1", "a2", "b1")
        generation = api.snapshot().generation
        barrier = threading.Barrier(2)

        def report(agent: Store, results: dict[str, str]) -> None:
            barrier.wait()
            agent.report_health("h1" if agent is h1 else "h2", {KEY: results})

        threads = [
            threading.Thread(target=report, args=(h1, {"a1": "up", "a2": "down: connect refused"})),
            threading.Thread(target=report, args=(h2, {"b1": "down: timeout", "a1": "down: not mine"})),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        want = {"a1": "up", "a2": "down: connect refused", "b1": "down: timeout"}  # h2's word on a1 ignored
        wait_until(lambda: api.mapping_health(KEY) == want)
        # Each report moved a backend to "down": Mapping.down changed, so each bumped the generation once.
        wait_until(lambda: api.snapshot().generation == generation + 2)
        assert api.snapshot().mappings[KEY].down == {"a2", "b1"}
        assert [b.container for b in api.snapshot().mappings[KEY].serving()] == ["a1"]
        with StateReader(server, timeout=10) as reader:
            assert reader.snapshot().mappings[KEY].down == {"a2", "b1"}  # the controller sees it
        wait_until(lambda: h1.mapping_health(KEY) == want)
        # The same report again writes nothing; a change writes only that entry.
        mutations: list[Any] = []
        add_op = ovs_idl.Transaction.add_op

        def counting(self: Any, op: Any) -> None:
            mutations.append(op)
            add_op(self, op)

        ovs_idl.Transaction.add_op = counting  # type: ignore[method-assign]
        try:
            h1.report_health("h1", {KEY: {"a1": "up", "a2": "down: connect refused"}})
            assert mutations == []
            h1.report_health("h1", {KEY: {"a1": "up", "a2": "down: timeout"}})  # another reason: no bump
            assert len(mutations) == 1  # positive control: a change is written
            wait_until(lambda: api.mapping_health(KEY)["a2"] == "down: timeout")
            assert api.snapshot().generation == generation + 2
            h1.report_health("h1", {KEY: {"a1": "up", "a2": "up"}})
            assert len(mutations) == 2  # (the generation increment is the IDL's own, checked below)
        finally:
            ovs_idl.Transaction.add_op = add_op  # type: ignore[method-assign]
        wait_until(lambda: api.mapping_health(KEY) == {**want, "a2": "up"})
        assert api.snapshot().mappings[KEY].down == {"b1"} and api.snapshot().generation == generation + 3
        # A removed backend's report goes with it; removing the check clears every report.
        api.update_mapping(KEY, lambda m: without_backend(m, "b1"))
        assert api.mapping_health(KEY) == {"a1": "up", "a2": "up"}
        api.update_mapping(KEY, lambda m: replace(m, health=None))
        assert api.mapping_health(KEY) == {}
        wait_until(lambda: KEY not in h1.snapshot().mappings)  # no check: out of the agents' views


def test_report_counters_needs_the_lock_and_writes_only_changes(api: Store, server: str) -> None:
    api.add_mapping(mapping(80, "a1"))
    api.add_mapping(mapping(81, "a2"))
    k81 = MappingKey(IP1, Proto.TCP, 81)
    first = MappingCounters(10, 1000, 2, 120)
    with StateReader(server, timeout=10, lock=LOCK) as master, StateReader(server, timeout=10, lock=LOCK) as standby:
        wait_until(master.lock_held)
        assert not standby.lock_held()
        with pytest.raises(StoreError, match=r"not owner|lock"):
            standby.report_counters({KEY: MappingCounters(1, 1, 1, 1)})
        assert api.mapping_counters(KEY) == MappingCounters()  # the refused write changed nothing
        assert master.report_counters({KEY: first, k81: MappingCounters()}) == 2  # positive control
        wait_until(lambda: api.mapping_counters(KEY) == first)
        assert master.report_counters({KEY: first, k81: MappingCounters()}) == 0  # unchanged: nothing
        assert master.report_counters({KEY: replace(first, allowed_packets=11)}) == 1
        wait_until(lambda: api.mapping_counters(KEY).allowed_packets == 11)
        assert master.report_counters({MappingKey(IP1, Proto.UDP, 5): first}) == 0  # not mapped: skipped
        with pytest.raises(StoreError):
            StateReader(server).report_counters({KEY: first})  # a reader without a lock may not


def test_removing_a_container_takes_it_out_of_balanced_mappings(api: Store) -> None:
    api.add_mapping(replace(balanced("a1", "a2", "b1"), health=CHECK))
    api.add_mapping(mapping(81, "a1"))
    api.report_health("h1", {KEY: {"a1": "down: x", "a2": "up"}})
    wait_until(lambda: api.mapping_health(KEY) == {"a1": "down: x", "a2": "up"})
    api.remove_container("a1")
    state = api.snapshot()
    assert MappingKey(IP1, Proto.TCP, 81) not in state.mappings  # its sole backend: the mapping went
    assert state.mappings[KEY] == Mapping(KEY, "a2", backends=(Backend("a2"), Backend("b1")), health=CHECK)
    assert api.mapping_health(KEY) == {"a2": "up"}
    api.remove_container("a2")
    assert api.snapshot().mappings[KEY].names == ("b1",)
    api.remove_container("b1")
    assert KEY not in api.snapshot().mappings and api.snapshot().mappings_of("b1") == []


def test_a_backend_added_while_its_container_is_removed_never_stays(api: Store, server: str) -> None:
    """The race the sweep closes: another client adds x as a backend while x is removed."""
    api.add_mapping(mapping(80, "a1"))
    outcomes: dict[str, int] = {"added first": 0, "refused": 0}
    with Store(server, timeout=20) as other:
        for i in range(15):
            name = f"x{i}"
            api.add_container(container(name, "h2", block=32768 + 1024 * (10 + i)))
            wait_until(lambda n=name: n in other.snapshot().containers)  # type: ignore[misc]
            refused = race_add_and_remove(api, other, name)
            outcomes["refused" if refused else "added first"] += 1
            wait_until(lambda: other.snapshot().generation == api.snapshot().generation)
            for view in (api, other):
                assert name not in view.snapshot().mappings[KEY].names
                assert view.snapshot().mappings[KEY].container == "a1"
    print(f"\nrace outcomes: {outcomes}")


def race_add_and_remove(api: Store, other: Store, name: str) -> bool:
    """``other`` adds ``name`` as a backend while ``api`` removes the container; True if the add was refused."""
    barrier = threading.Barrier(2)
    refused: list[BaseException] = []

    def add() -> None:
        barrier.wait()
        try:
            other.update_mapping(KEY, lambda m: replace(m, backends=(*m.backends, Backend(name))))
        except NotFound as exc:
            refused.append(exc)

    def remove() -> None:
        barrier.wait()
        api.remove_container(name)

    run(add, remove)
    return bool(refused)


def run(*targets: Callable[[], None]) -> None:
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def schema_1_5_0(tmp_path: Path) -> Path:
    """The Portmesh schema as 1.5.0 had it: a Mapping was (key, container) and nothing else."""
    schema = json.loads(schema_path().read_text())
    schema["version"] = "1.5.0"
    for column in ("backends", "allow", "deny", "health", "backend_health", "counters"):
        del schema["tables"]["Mapping"]["columns"][column]
    path = tmp_path / "1.5.0.ovsschema"
    path.write_text(json.dumps(schema))
    return path


def test_upgrade_from_1_5_0_keeps_the_mappings_as_plain_ones(tmp_path: Path) -> None:
    db = create_db(tmp_path / "store.db", schema_1_5_0(tmp_path))
    c = container("a1")
    ops = ["Portmesh",
           {"op": "insert", "table": "Host", "row": {"name": "h1", "datapath_id": 1}},
           {"op": "update", "table": "Global", "where": [], "row": {"generation": 4}},
           {"op": "insert", "table": "Container", "row": {
               "name": "a1", "host": "h1", "mac": c.mac, "ips": str(IP1), "block_start": 32768,
               "block_size": 1024, "command": "[]", "env": "[]"}},
           {"op": "insert", "table": "Mapping", "row": {"public_ip": str(IP1), "proto": "tcp", "port": 80,
                                                       "container": "a1"}}]
    subprocess.run(["ovsdb-tool", "transact", str(db), json.dumps(ops)], check=True, capture_output=True)
    cmd = [sys.executable, "-m", "portmesh.store", "upgrade", str(db)]
    assert subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip() == "converted"
    assert subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip() == "already current"
    version = subprocess.run(["ovsdb-tool", "db-version", str(db)], check=True, capture_output=True, text=True)
    assert version.stdout.strip() == json.loads(schema_path().read_text())["version"]  # 1.6.0 or later
    pid = start_server(db, tmp_path / "store.sock", create=False)
    try:
        remote = f"unix:{tmp_path / 'store.sock'}"
        with Store(remote, timeout=10) as store, StateReader(remote, timeout=10) as reader:
            assert store.snapshot().generation == 4
            assert store.snapshot().mappings == reader.snapshot().mappings == {KEY: Mapping(KEY, "a1")}
            store.add_container(container("a2", block=33792))
            store.update_mapping(KEY, lambda m: with_backend(store.snapshot(), m, "a2", 5))  # the new columns work
            assert store.snapshot().mappings[KEY].backends == (Backend("a1"), Backend("a2", 5))
    finally:
        stop_server(pid)


def test_a_new_database_is_made_at_1_6_0(tmp_path: Path) -> None:
    db = create_db(tmp_path / "store.db")
    version = subprocess.run(["ovsdb-tool", "db-version", str(db)], check=True, capture_output=True, text=True)
    assert version.stdout.strip() == json.loads(schema_path().read_text())["version"]  # 1.6.0 or later


def test_a_running_reader_follows_a_mapping_from_plain_to_balanced_and_back(api: Store, server: str) -> None:
    """The reader builds plain rows on a fast path and the others through the row converters: a row
    that moves between the two (update2 diffs of its map and set columns) must read the same as the
    IDL client's after every step."""
    with StateReader(server, timeout=10) as reader:
        api.add_mapping(mapping(80, "a1"))
        steps: list[Callable[[Mapping], Mapping]] = [
            lambda m: with_backend(api.snapshot(), m, "b1", 2),
            lambda m: replace(m, deny=(IPv4Network("198.51.100.7/32"),), health=CHECK),
            lambda m: replace(m, deny=(), health=None),
            lambda m: without_backend(m, "b1"),
            lambda m: replace(m, allow=(IPv4Network("198.51.100.0/24"),)),
            lambda m: replace(m, allow=()),
        ]
        for step in steps:
            generation = api.update_mapping(KEY, step)
            wait_until(lambda g=generation: reader.snapshot().generation >= g)  # type: ignore[misc]
            assert reader.snapshot().mappings == api.snapshot().mappings
        assert reader.snapshot().mappings[KEY] == Mapping(KEY, "a1")  # plain again


def test_a_1_5_0_raft_cluster_is_upgraded_online(tmp_path: Path) -> None:
    """A cluster converts online (``upgrade tcp:...`` through one member); its mappings stay, now plain
    1.6.0 rows a balanced change can be written to."""
    from tests.switch.test_store import _free_port

    seed = create_db(tmp_path / "seed.db", schema_1_5_0(tmp_path))
    c = container("a1")
    ops = ["Portmesh", {"op": "insert", "table": "Host", "row": {"name": "h1", "datapath_id": 1}},
           {"op": "insert", "table": "Container", "row": {
               "name": "a1", "host": "h1", "mac": c.mac, "ips": str(IP1), "block_start": 32768,
               "block_size": 1024, "command": "[]", "env": "[]"}},
           {"op": "insert", "table": "Mapping", "row": {"public_ip": str(IP1), "proto": "tcp", "port": 80,
                                                       "container": "a1"}}]
    subprocess.run(["ovsdb-tool", "transact", str(seed), json.dumps(ops)], check=True, capture_output=True)
    db = tmp_path / "m0.db"
    subprocess.run(["ovsdb-tool", "create-cluster", str(db), str(seed), f"tcp:127.0.0.1:{_free_port()}"], check=True)
    port = _free_port()
    pid = start_server(db, tmp_path / "m0.sock", tcp=f"127.0.0.1:{port}", create=False)
    try:
        remote = f"tcp:127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "portmesh.store", "upgrade", remote]
        assert subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip() == "converted"
        assert subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip() == "already current"
        with Store(remote, timeout=15) as store:
            assert store.snapshot().mappings == {KEY: Mapping(KEY, "a1")}
            store.update_mapping(KEY, lambda m: replace(m, deny=(IPv4Network("198.51.100.7/32"),)))
            assert store.snapshot().mappings[KEY].filtered
    finally:
        stop_server(pid)
