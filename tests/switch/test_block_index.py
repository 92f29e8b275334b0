"""Ephemeral port blocks stay unique through the store's ``Block`` index, whatever the number of
writers: a real ovsdb-server refuses a second claim of (public IP, block), two API instances over
two store clients creating at once never share a block, and a database from before the index
comes up with its containers' blocks claimed."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from portmesh.api.schemas import ContainerIn
from portmesh.api.service import Service
from portmesh.model.blocks import BlockTaken
from portmesh.model.config import NetworkConfig
from portmesh.model.entities import Container, Host, Mapping, PortBlock, mac_for
from portmesh.model.errors import Conflict
from portmesh.store.client import Store
from portmesh.store.rows import schema_path
from portmesh.store.server import claim_blocks, create_db, start_server, stop_server

pytestmark = [
    pytest.mark.switch,
    pytest.mark.skipif(shutil.which("ovsdb-server") is None, reason="openvswitch is not installed"),
]

IP = IPv4Address("203.0.113.20")
# 64-port blocks: 512 of them in the ephemeral range, room for every create below.
CONFIG = NetworkConfig(block_size=64)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    pid = start_server(tmp_path / "store.db", tmp_path / "store.sock")
    try:
        yield f"unix:{tmp_path / 'store.sock'}"
    finally:
        stop_server(pid)


def transact(remote: str, *ops: object) -> list[dict[str, object]]:
    out = subprocess.run(
        ["ovsdb-client", "transact", remote, json.dumps(["Portmesh", *ops])], check=True, capture_output=True, text=True
    ).stdout
    result: list[dict[str, object]] = json.loads(out)
    return result


def claim(ip: str, start: int, container: str) -> dict[str, object]:
    return {"op": "insert", "table": "Block", "row": {"public_ip": ip, "block_start": start, "container": container}}


def test_the_index_refuses_a_second_claim_of_a_block(server: str) -> None:
    assert "error" not in transact(server, claim(str(IP), 32768, "a"))[0]
    assert "error" not in transact(server, claim(str(IP), 32832, "b"))[0]  # control: another block is fine
    assert "error" not in transact(server, claim("203.0.113.21", 32768, "c"))[0]  # and so is another IP
    refused = transact(server, claim(str(IP), 32768, "d"))
    assert any(reply.get("error") == "constraint violation" for reply in refused), refused


def test_store_maps_a_lost_claim_to_block_taken(server: str) -> None:
    with Store(server, timeout=5) as store:
        store.add_host(Host("h1", 1))
        store.add_container(Container("a", "h1", mac_for("a"), (IP,), PortBlock(32768, 64)))
        with pytest.raises(BlockTaken) as err:
            store.add_container(Container("b", "h1", mac_for("b"), (IP,), PortBlock(32768, 64)))
        assert err.value.field == "ips"
        store.remove_container("a")  # the claim goes with its container
        store.add_container(Container("b", "h1", mac_for("b"), (IP,), PortBlock(32768, 64)))


class CountingStore:
    """A store client that counts the claims the index refused (the races the writers lost)."""

    def __init__(self, store: Store) -> None:
        self.store, self.lost = store, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)

    def add_container(self, c: Container, mappings: Sequence[Mapping] = ()) -> int:
        try:
            return self.store.add_container(c, mappings)
        except BlockTaken:
            self.lost += 1
            raise


def test_two_api_instances_creating_at_once_never_share_a_block(server: str) -> None:
    per_task, tasks_per_api = 20, 4
    outcomes: list[tuple[str, Container | None, Exception | None]] = []
    lock = threading.Lock()
    with Store(server, timeout=10) as s1, Store(server, timeout=10) as s2:
        s1.set_config(CONFIG)  # the API reads the block size from the store's config
        s1.add_host(Host("h1", 1))
        counted = [CountingStore(s1), CountingStore(s2)]
        apis = [Service(c, CONFIG) for c in counted]  # type: ignore[arg-type]

        def run(api: Service, n: int) -> None:
            """One API instance: its own event loop, ``tasks_per_api`` creates in flight at a time."""

            async def create_all(tag: str) -> None:
                for i in range(per_task):
                    name = f"{tag}-{i}"
                    try:
                        _, c, _ = await api.add_container(ContainerIn(name=name, host="h1", ips=[str(IP)]))
                        got: tuple[str, Container | None, Exception | None] = (name, c, None)
                    except Conflict as exc:
                        got = (name, None, exc)
                    with lock:
                        outcomes.append(got)

            async def main() -> None:
                await asyncio.gather(*(create_all(f"a{n}t{t}") for t in range(tasks_per_api)))

            asyncio.run(main())

        workers = [threading.Thread(target=run, args=(api, n)) for n, api in enumerate(apis)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        assert not any(w.is_alive() for w in workers)
        total = per_task * tasks_per_api * len(apis)
        assert len(outcomes) == total
        failed = [(name, exc) for name, _, exc in outcomes if exc is not None]
        for _, exc in failed:  # a refusal is the clear one after bounded retries, nothing else
            assert exc is not None and exc.field == "ips" and "try again" in exc.reason
        made = {name: c for name, c, _ in outcomes if c is not None}
        assert len(made) >= total - len(failed) > 0
        assert len({c.block for c in made.values()}) == len(made)  # every block distinct
        # The writers did race (positive control): the index refused some claims, and they were retried.
        lost = sum(c.lost for c in counted)
        print(f"{len(made)} created, {len(failed)} refused after retries, {lost} claims lost to the other writer")
        assert lost > 0
        stored = s2.snapshot().containers
        assert set(stored) == set(made)
        assert len({c.block for c in stored.values()}) == len(stored)


def old_schema(tmp_path: Path) -> Path:
    """The Portmesh schema as 1.2.0 had it: no Block table."""
    schema = json.loads(schema_path().read_text())
    schema["version"] = "1.2.0"
    del schema["tables"]["Block"]
    path = tmp_path / "old.ovsschema"
    path.write_text(json.dumps(schema))
    return path


def old_database(tmp_path: Path) -> Path:
    """A 1.2.0 database holding two containers (one on two IPs) and no claims."""
    db = create_db(tmp_path / "store.db", old_schema(tmp_path))
    rows = [
        {"op": "insert", "table": "Host", "row": {"name": "h1", "datapath_id": 1}},
        *(
            {"op": "insert", "table": "Container",
             "row": {"name": name, "host": "h1", "mac": mac_for(name), "ips": ips, "block_start": start,
                     "block_size": 64, "command": "[]", "running": True}}
            for name, ips, start in (
                ("old1", str(IP), 32768),
                ("old2", ["set", [str(IP), "203.0.113.21"]], 32832),
            )
        ),
    ]
    subprocess.run(["ovsdb-tool", "transact", str(db), json.dumps(["Portmesh", *rows])], check=True, capture_output=True)
    return db


def assert_old_blocks_claimed(remote: str) -> None:
    columns = ["public_ip", "block_start", "container"]
    claims = transact(remote, {"op": "select", "table": "Block", "where": [], "columns": columns})
    got = {(r["public_ip"], r["block_start"], r["container"]) for r in claims[0]["rows"]}  # type: ignore[attr-defined]
    assert got == {(str(IP), 32768, "old1"), (str(IP), 32832, "old2"), ("203.0.113.21", 32832, "old2")}
    with Store(remote, timeout=5) as store:
        assert set(store.snapshot().containers) == {"old1", "old2"}  # rows kept
        store.set_config(CONFIG)  # the API reads the block size from the store's config
        with pytest.raises(BlockTaken):  # the old block is claimed: the index stands for it
            store.add_container(Container("new", "h1", mac_for("new"), (IP,), PortBlock(32768, 64)))
        _, c, _ = asyncio.run(Service(store, CONFIG).add_container(ContainerIn(name="new", host="h1", ips=[str(IP)])))
        assert c.block == PortBlock(32896, 64)  # control: the next free one is given


def test_containers_of_an_older_database_come_up_with_their_blocks_claimed(tmp_path: Path) -> None:
    db = old_database(tmp_path)
    pid = start_server(db, tmp_path / "store.sock")
    try:
        assert_old_blocks_claimed(f"unix:{tmp_path / 'store.sock'}")
    finally:
        stop_server(pid)
    assert claim_blocks(db) == 0  # every container is claimed: nothing left to do


def test_the_serve_command_claims_the_blocks_of_an_older_database(tmp_path: Path) -> None:
    db, sock = old_database(tmp_path), tmp_path / "store.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "portmesh.store", "serve", "--db", str(db), "--socket", str(sock)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        ready = False
        while not ready and proc.poll() is None and time.monotonic() < deadline:
            ready = sock.exists() and subprocess.run(
                ["ovsdb-client", "list-dbs", f"unix:{sock}"], capture_output=True, timeout=5
            ).returncode == 0
        assert ready, proc.stderr.read() if proc.stderr and proc.poll() is not None else "not listening"
        assert_old_blocks_claimed(f"unix:{sock}")
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_block_held_twice_in_an_older_database_is_claimed_by_the_first_name(tmp_path: Path) -> None:
    db = old_database(tmp_path)
    twin = {"name": "old0", "host": "h1", "mac": mac_for("old0"), "ips": str(IP), "block_start": 32768,
            "block_size": 64, "command": "[]", "running": True}  # the race the index closes, from before it
    subprocess.run(
        ["ovsdb-tool", "transact", str(db), json.dumps(["Portmesh", {"op": "insert", "table": "Container", "row": twin}])],
        check=True, capture_output=True,
    )
    pid = start_server(db, tmp_path / "store.sock")
    try:
        remote = f"unix:{tmp_path / 'store.sock'}"
        claims = transact(remote, {"op": "select", "table": "Block", "where": [["block_start", "==", 32768]]})
        assert [(r["public_ip"], r["container"]) for r in claims[0]["rows"]] == [(str(IP), "old0")]  # type: ignore[attr-defined]
        with Store(remote, timeout=5) as store:
            assert set(store.snapshot().containers) == {"old0", "old1", "old2"}  # the server still came up
    finally:
        stop_server(pid)


def test_claim_blocks_command_claims_online_on_a_running_server(server: str) -> None:
    """What a Raft cluster needs after ``ovsdb-client convert``: the claims written through the server."""
    transact(server, {"op": "insert", "table": "Host", "row": {"name": "h1", "datapath_id": 1}})
    transact(server, {"op": "insert", "table": "Container",
                      "row": {"name": "raw", "host": "h1", "mac": mac_for("raw"), "ips": str(IP), "block_start": 33024,
                              "block_size": 64, "command": "[]", "running": True}})
    command = [sys.executable, "-m", "portmesh.store", "claim-blocks", server]
    first = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    assert first.strip() == "1 port block claims written"
    again = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    assert again.strip() == "0 port block claims written"  # idempotent
    with Store(server, timeout=5) as store, pytest.raises(BlockTaken):
        store.add_container(Container("new", "h1", mac_for("new"), (IP,), PortBlock(33024, 64)))
