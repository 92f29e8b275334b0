"""remove_host against a concurrent add_container on a real ovsdb-server: a host is never removed from
under a container placed on it, whichever client commits first (the API checks first, but two API
instances or a CLI racing it can still interleave)."""

from __future__ import annotations

import threading
from ipaddress import IPv4Address

from portmesh.model.entities import Container, Host, Mapping, MappingKey, PortBlock, Proto, mac_for
from portmesh.model.errors import Conflict, NotFound
from portmesh.store.client import Store
from tests.switch.test_store import server
from tests.switch.test_store_mirror import wait_until

__all__ = ["server"]  # the fixture, re-used


def test_remove_host_never_orphans_a_container_added_meanwhile(server: str) -> None:
    rounds = 60
    orphans: list[str] = []
    removed = placed = 0
    with Store(server, timeout=10) as adder, Store(server, timeout=10) as remover:
        for r in range(rounds):
            host = f"x{r}"
            adder.add_host(Host(host, 100 + r))
            wait_until(lambda: host in remover.snapshot().hosts)  # noqa: B023 (called right here)
            go = threading.Barrier(2)
            outcome: dict[str, object] = {}

            def add(host: str = host, r: int = r, go: threading.Barrier = go, out: dict[str, object] = outcome) -> None:
                name = f"c{r}"
                go.wait()
                try:
                    out["add"] = adder.add_container(
                        Container(name, host, mac_for(name), (IPv4Address("203.0.113.30"),), PortBlock(32768 + r * 8, 8))
                    )
                except (NotFound, Conflict) as exc:
                    out["add"] = exc

            t = threading.Thread(target=add)
            t.start()
            go.wait()
            try:
                remover.remove_host(host)
                removed += 1
            except Conflict:
                pass
            t.join(20)
            generation = remover.snapshot().generation
            wait_until(lambda: adder.snapshot().generation >= generation)  # noqa: B023 (called right here)
            state = adder.snapshot()
            placed += f"c{r}" in state.containers
            if f"c{r}" in state.containers and host not in state.hosts:
                orphans.append(f"c{r}")
            if f"c{r}" in state.containers:
                adder.remove_container(f"c{r}")
            adder.remove_host(host, if_exists=True)
    print(f"{rounds} rounds: host removed {removed}, container placed {placed}, orphaned {len(orphans)}")
    assert removed and placed  # both sides won some races (positive control)
    assert not orphans, f"containers left on a removed host: {orphans}"


def test_remove_container_never_orphans_a_mapping_added_meanwhile(server: str) -> None:
    rounds = 60
    orphans: list[str] = []
    removed = mapped = 0
    swept: list[int] = []
    with Store(server, timeout=10) as mapper, Store(server, timeout=10) as remover:
        sweep = remover._sweep_mappings

        def counting_sweep(container: str) -> int:
            generation = sweep(container)
            swept.append(generation)
            return generation

        remover._sweep_mappings = counting_sweep  # type: ignore[method-assign]
        mapper.add_host(Host("h1", 1))
        for r in range(rounds):
            name = f"c{r}"
            mapper.add_container(Container(name, "h1", mac_for(name), (IPv4Address("203.0.113.31"),), PortBlock(32768, 8)))
            wait_until(lambda: name in remover.snapshot().containers)  # noqa: B023 (called right here)
            key = MappingKey(IPv4Address("203.0.113.31"), Proto.TCP, 1000 + r)
            go = threading.Barrier(2)
            result: list[object] = []

            def add(key: MappingKey = key, name: str = name, go: threading.Barrier = go, out: list[object] = result) -> None:
                go.wait()
                try:
                    out.append(mapper.add_mapping(Mapping(key, name)))
                except (NotFound, Conflict) as exc:
                    out.append(exc)

            t = threading.Thread(target=add)
            t.start()
            go.wait()
            remover.remove_container(name)
            removed += 1
            t.join(20)
            mapped += isinstance(result[0], int)
            generation = remover.snapshot().generation
            wait_until(lambda: mapper.snapshot().generation >= generation)  # noqa: B023 (called right here)
            state = mapper.snapshot()
            if key in state.mappings:
                orphans.append(str(key))
                mapper.remove_mapping(key)
    sweeps = sum(1 for g in swept if g)
    print(f"{rounds} rounds: mapping added before the removal {mapped}, swept after it {sweeps}, orphaned {len(orphans)}")
    assert mapped and removed  # the mapping won some races (positive control)
    assert not orphans, f"mappings left pointing at a removed container: {orphans}"
