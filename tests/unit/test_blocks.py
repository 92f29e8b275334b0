"""Port-block allocation: the pure choice (``exclude``), the store error that says a block was taken
meanwhile, and the API's bounded retry with the refused block left out."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Sequence
from ipaddress import IPv4Address

import pytest

from portmesh.api.schemas import ContainerIn, MappingIn, PortIn
from portmesh.api.service import Service
from portmesh.model.blocks import CLAIM_ATTEMPTS, BlockTaken, allocate_block, candidate_blocks
from portmesh.model.config import NetworkConfig
from portmesh.model.entities import Container, DesiredState, Host, Mapping, PortBlock
from portmesh.model.errors import Conflict
from portmesh.store import rows as R
from tests.unit.fakes import FakeStore

CONFIG = NetworkConfig()
IP = IPv4Address("203.0.113.10")


def test_lowest_free_block_and_exclude_skips_refused_blocks() -> None:
    first, second, third = candidate_blocks(CONFIG)[:3]
    assert allocate_block(DesiredState(), CONFIG, [IP]) == first  # positive control
    assert allocate_block(DesiredState(), CONFIG, [IP], frozenset({first})) == second
    assert allocate_block(DesiredState(), CONFIG, [IP], frozenset({first, second})) == third


def test_nth_free_block_spreads_retries_and_clamps_to_the_last() -> None:
    blocks = candidate_blocks(CONFIG)
    assert allocate_block(DesiredState(), CONFIG, [IP], frozenset({blocks[1]}), nth=1) == blocks[2]
    assert allocate_block(DesiredState(), CONFIG, [IP], nth=10**6) == blocks[-1]


def test_exclude_of_every_block_is_a_conflict_naming_ips() -> None:
    with pytest.raises(Conflict) as err:
        allocate_block(DesiredState(), CONFIG, [IP], frozenset(candidate_blocks(CONFIG)))
    assert err.value.field == "ips"


def test_block_index_violation_is_block_taken() -> None:
    details = (
        'Transaction causes multiple rows in "Block" table to have identical values '
        '("203.0.113.10" and 32768) for index on columns "public_ip" and "block_start".'
    )
    err = R.error_from_commit(json.dumps({"error": "constraint violation", "details": details}))
    assert isinstance(err, BlockTaken) and err.field == "ips"
    other = R.error_from_commit(json.dumps({"error": "constraint violation", "details": details.replace("Block", "Host")}))
    assert isinstance(other, Conflict) and not isinstance(other, BlockTaken)  # control: other tables unchanged


def test_block_claims_one_per_ip() -> None:
    c = Container("c", "h1", "02:00:00:00:00:01", (IP, IPv4Address("203.0.113.11")), PortBlock(33792, 1024))
    assert R.block_claims(c) == [("203.0.113.10", 33792), ("203.0.113.11", 33792)]


class RacingStore(FakeStore):
    """Refuses the first ``lose`` creates as if another writer had claimed their block first."""

    def __init__(self, lose: int) -> None:
        super().__init__()
        self.lose = lose
        self.tried: list[PortBlock] = []

    def add_container(self, c: Container, mappings: Sequence[Mapping] = ()) -> int:
        self.tried.append(c.block)
        if len(self.tried) <= self.lose:
            raise BlockTaken("ips", "claimed meanwhile")
        return super().add_container(c, mappings)


def service(lose: int) -> tuple[Service, RacingStore]:
    store = RacingStore(lose)
    store.add_host(Host("h1", 1))
    return Service(store, CONFIG), store


def test_a_lost_race_retries_with_another_block() -> None:
    svc, store = service(lose=2)
    _, container, _ = asyncio.run(svc.add_container(ContainerIn(name="c1", host="h1", ips=[str(IP)])))
    assert store.tried[0] == candidate_blocks(CONFIG)[0]  # the first try is the lowest free block
    assert len(set(store.tried)) == 3  # each retry skipped the blocks refused before
    assert container.block == store.tried[2]
    assert store.snapshot().containers["c1"].block == store.tried[2]


def test_retries_are_bounded_then_409_naming_ips() -> None:
    svc, store = service(lose=CLAIM_ATTEMPTS)
    with pytest.raises(Conflict) as err:
        asyncio.run(svc.add_container(ContainerIn(name="c1", host="h1", ips=[str(IP)])))
    assert err.value.field == "ips" and not isinstance(err.value, BlockTaken)
    assert len(store.tried) == CLAIM_ATTEMPTS and len(set(store.tried)) == CLAIM_ATTEMPTS
    assert "c1" not in store.snapshot().containers  # nothing changed
    assert not svc._claiming  # no in-flight block left behind


def test_concurrent_creates_in_one_instance_get_distinct_blocks_without_a_lock() -> None:
    svc, _store = service(lose=0)

    async def many() -> list[Container]:
        made = await asyncio.gather(
            *(svc.add_container(ContainerIn(name=f"c{i}", host="h1", ips=[str(IP)])) for i in range(10))
        )
        return [c for _, c, _ in made]

    containers = asyncio.run(many())
    assert len({c.block for c in containers}) == 10


def test_a_create_never_takes_a_block_holding_its_own_mapped_port() -> None:
    svc, _store = service(lose=0)
    blocks = candidate_blocks(CONFIG)
    body = ContainerIn(name="c1", host="h1", ips=[str(IP)], ports=[PortIn(port=blocks[0].start + 5)])
    _, container, mappings = asyncio.run(svc.add_container(body))
    assert container.block == blocks[1] and [m.port for m in mappings] == [blocks[0].start + 5]
    _, plain, _ = asyncio.run(svc.add_container(ContainerIn(name="c2", host="h1", ips=["203.0.113.11"])))
    assert plain.block == blocks[0]  # control: without the port the lowest block is given


class SlowStore(FakeStore):
    """Holds every add_container and add_mapping until released, so the test can act while one is in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()
        self.container_entered = threading.Event()

    def add_container(self, c: Container, mappings: Sequence[Mapping] = ()) -> int:
        self.entered.set()
        self.container_entered.set()
        self.release.wait(10)
        return super().add_container(c, mappings)

    def add_mapping(self, m: Mapping) -> int:
        self.entered.set()
        self.release.wait(10)
        return super().add_mapping(m)


def test_a_mapping_into_a_block_a_create_is_claiming_is_refused() -> None:
    store = SlowStore()
    store.add_host(Host("h1", 1))
    store.release.set()
    store.add_container(Container("old", "h1", "02:00:00:00:00:09", (IP,), candidate_blocks(CONFIG)[5]))
    store.release.clear()
    svc = Service(store, CONFIG)
    first = candidate_blocks(CONFIG)[0]

    async def race() -> tuple[Exception | None, Mapping]:
        create = asyncio.create_task(svc.add_container(ContainerIn(name="c1", host="h1", ips=[str(IP)])))
        await asyncio.to_thread(store.entered.wait, 10)
        refused: Exception | None = None
        try:
            await svc.add_mapping(MappingIn(public_ip=str(IP), port=first.start + 1, container="old"))
        except Conflict as exc:
            refused = exc
        outside = MappingIn(public_ip=str(IP), port=80, container="old")  # control: a port outside the block
        store.release.set()
        _, ok, _ = await svc.add_mapping(outside)
        await create
        return refused, ok

    refused, ok = asyncio.run(race())
    assert isinstance(refused, Conflict) and refused.field == "port"
    assert ok.port == 80


def test_a_create_skips_the_block_of_a_port_being_mapped() -> None:
    store = SlowStore()
    store.add_host(Host("h1", 1))
    store.release.set()
    store.add_container(Container("old", "h1", "02:00:00:00:00:09", (IP,), candidate_blocks(CONFIG)[5]))
    store.release.clear()
    store.entered.clear()
    svc = Service(store, CONFIG)
    first = candidate_blocks(CONFIG)[0]

    async def race() -> Container:
        mapping = asyncio.create_task(svc.add_mapping(MappingIn(public_ip=str(IP), port=first.start + 1, container="old")))
        await asyncio.to_thread(store.entered.wait, 10)
        store.container_entered.clear()
        create = asyncio.create_task(svc.add_container(ContainerIn(name="c1", host="h1", ips=[str(IP)])))
        await asyncio.to_thread(store.container_entered.wait, 10)  # planned while the mapping is in flight
        assert not mapping.done()
        store.release.set()
        await mapping
        _, c, _ = await create
        return c

    assert asyncio.run(race()).block == candidate_blocks(CONFIG)[1]


class NameRacingStore(FakeStore):
    """Refuses the first create as if another writer had just taken its (generated) name."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def add_container(self, c: Container, mappings: Sequence[Mapping] = ()) -> int:
        self.names.append(c.name)
        if len(self.names) == 1:
            raise Conflict("name", "a container with this name already exists")
        return super().add_container(c, mappings)


def test_a_generated_name_taken_meanwhile_is_generated_again_but_a_given_one_is_refused() -> None:
    store = NameRacingStore()
    store.add_host(Host("h1", 1))
    _, container, _ = asyncio.run(Service(store, CONFIG).add_container(ContainerIn(host="h1", ips=[str(IP)])))
    assert len(store.names) == 2 and container.name == store.names[1]
    given = NameRacingStore()
    given.add_host(Host("h1", 1))
    with pytest.raises(Conflict) as err:
        asyncio.run(Service(given, CONFIG).add_container(ContainerIn(name="c1", host="h1", ips=[str(IP)])))
    assert err.value.field == "name" and given.names == ["c1"]
