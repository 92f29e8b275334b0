"""The map sync's diff logic against in-memory maps: only differences, in order, restart-safe, resumable.

A fake map stands for ``loader.BpfMap`` (same methods, bytes in and out) and logs every
write, so the tests see exactly which writes a pass made and in which order. The real
maps are exercised in tests/ebpf/test_sync_maps.py.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Address

import pytest

from portmesh.agent.ebpf import compile as ec
from portmesh.agent.ebpf import layout, sync
from portmesh.model.entities import Mapping, MappingKey, Proto
from tests.unit.test_ebpf_compile import IFX, STATE

CPUS = 3
PERCPU = {"mapping_stats", "drops"}
VALUE_SIZE = {"mapping_stats": 16, "drops": 16, "mapping_denied": 16}
Log = list[tuple[str, str, bytes]]


class FakeMap:
    """An in-memory map with ``loader.BpfMap``'s methods; per-CPU values are CPUS slots back to back."""

    def __init__(self, name: str, log: Log, value_size: int = 4) -> None:
        self.name, self.log, self.value_size = name, log, value_size
        self.data: dict[bytes, bytes] = {}
        self.fail_after: int | None = None  # writes that succeed before one raises ENOSPC (then all do)

    def _write(self) -> None:
        if self.fail_after is not None:
            if self.fail_after <= 0:
                raise OSError(errno.E2BIG, f"update map {self.name}: Argument list too long")
            self.fail_after -= 1

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        self._write()
        if flags == sync.BPF_NOEXIST and key in self.data:
            raise OSError(errno.EEXIST, f"update map {self.name}: File exists")
        self.data[key] = value
        self.log.append(("update", self.name, key))

    def delete(self, key: bytes) -> bool:
        self._write()
        self.log.append(("delete", self.name, key))
        return self.data.pop(key, None) is not None

    def lookup(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def keys(self) -> Iterator[bytes]:
        return iter(list(self.data))

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(list(self.data.items()))


def fake_maps(log: Log) -> dict[str, FakeMap]:
    maps = {name: FakeMap(name, log, VALUE_SIZE.get(name, 4)) for name in (*layout.MAPS, *layout.STAT_MAPS)}
    maps["config"].data[struct.pack("=I", 0)] = bytes(24)  # an array's entry always exists
    return maps


def compiled(state=STATE, host: str = "h1", ifx: dict[str, int] | None = None) -> ec.Compiled:  # type: ignore[no-untyped-def]
    return ec.MapCompiler(host).compile(state, IFX[host] if ifx is None else ifx)


def contents(maps: dict[str, FakeMap]) -> dict[str, dict[bytes, bytes]]:
    return {name: dict(maps[name].data) for name in layout.MAPS}


def test_first_pass_writes_everything_then_nothing() -> None:
    log: Log = []
    maps, out = fake_maps(log), compiled()
    done = sync.MapSync(cpus=CPUS).apply(maps, out)
    assert contents(maps) == out.maps
    assert set(maps["mapping_stats"].data) == out.stat_keys
    counters = len(out.stat_keys) + len(out.denied_keys)
    assert done.writes == len(log) == sum(map(len, out.maps.values())) + counters  # config: a change
    assert done.changed == {"config": 1}


def test_an_agent_restart_with_the_same_state_writes_nothing_and_keeps_the_counters() -> None:
    log: Log = []
    maps = fake_maps(log)
    sync.MapSync(cpus=CPUS).apply(maps, compiled())
    key = ec.mapping_key(MappingKey(IPv4Address("203.0.113.10"), Proto.TCP, 80))
    maps["mapping_stats"].data[key] = struct.pack("=QQ", 3, 300) * CPUS  # the program counted meanwhile
    log.clear()
    done = sync.MapSync(cpus=CPUS).apply(maps, compiled())  # a new agent: new sync, new compiler
    assert (done.writes, log) == (0, [])
    assert sync.read_counters(maps, MappingKey(IPv4Address("203.0.113.10"), Proto.TCP, 80)) == (3 * CPUS, 300 * CPUS)


def test_a_change_writes_only_the_difference() -> None:
    log: Log = []
    maps, s = fake_maps(log), sync.MapSync(cpus=CPUS)
    s.apply(maps, compiled())
    k80, k22 = MappingKey(IPv4Address("203.0.113.10"), Proto.TCP, 80), MappingKey(IPv4Address("203.0.113.11"), Proto.TCP, 22)
    mappings = {k: m for k, m in STATE.mappings.items() if k != k22}
    mappings[k80] = Mapping(k80, "b")
    log.clear()
    out = compiled(replace(STATE, mappings=mappings))
    done = s.apply(maps, out)
    assert (done.added, done.changed, done.deleted) == ({}, {"mappings": 1}, {"mappings": 1, "mapping_stats": 1})
    assert log == [("update", "mappings", ec.mapping_key(k80)), ("delete", "mappings", ec.mapping_key(k22)),
                   ("delete", "mapping_stats", ec.mapping_key(k22))]  # fmt: skip
    assert contents(maps) == out.maps


def test_counters_are_created_zeroed_per_cpu_never_overwritten_and_stale_ones_deleted() -> None:
    log: Log = []
    maps = fake_maps(log)
    out = compiled()
    held = sorted(out.stat_keys)[0]
    stale = ec.mapping_key(MappingKey(IPv4Address("203.0.113.99"), Proto.UDP, 7))
    maps["mapping_stats"].data[held] = struct.pack("=QQ", 1, 2) * CPUS
    maps["mapping_stats"].data[stale] = struct.pack("=QQ", 5, 6) * CPUS
    sync.MapSync(cpus=CPUS).apply(maps, out)
    stats = maps["mapping_stats"].data
    assert set(stats) == out.stat_keys and stats[held] == struct.pack("=QQ", 1, 2) * CPUS
    assert {v for k, v in stats.items() if k != held} == {bytes(16 * CPUS)}
    assert ("update", "mapping_stats", held) not in log


def test_a_counter_created_by_someone_else_meanwhile_is_left_alone() -> None:
    maps, s = fake_maps([]), sync.MapSync(cpus=CPUS)
    out = compiled()
    s.apply(maps, replace(out, stat_keys=frozenset()))
    key = sorted(out.stat_keys)[0]
    maps["mapping_stats"].data[key] = struct.pack("=QQ", 9, 9) * CPUS
    s.apply(maps, out)
    assert maps["mapping_stats"].data[key] == struct.pack("=QQ", 9, 9) * CPUS


def test_adds_in_dependency_order_then_deletes_in_reverse() -> None:
    log: Log = []
    maps, s = fake_maps(log), sync.MapSync(cpus=CPUS)
    s.apply(maps, compiled())
    first = [name for _op, name, _k in log]
    order = ["networks", "owned_ips", "blocks", "macs", "ports", "backends", "slots", "policy", "mapping_stats",
             "mapping_denied", "mappings", "public_ips", "networks", "config"]
    assert [n for i, n in enumerate(first) if i == 0 or first[i - 1] != n] == order
    fences = [k for op, n, k in log if n == "networks"]
    assert [maps["networks"].data[k] for k in fences][-1] == struct.pack("=I", layout.NET_POOL)  # pools after fences
    log.clear()
    s.apply(maps, compiled(replace(STATE, containers={}, mappings={})))  # everything goes but config and networks
    deletes = [n for op, n, _k in log if op == "delete"]
    assert [n for i, n in enumerate(deletes) if i == 0 or deletes[i - 1] != n] == [
        "public_ips", "mappings", "mapping_stats", "mapping_denied", "policy", "slots", "backends", "ports", "macs",
        "blocks", "owned_ips"]  # fmt: skip

    # A container replaced by another (one port goes, one comes): every add before the first delete.
    log.clear()
    s = sync.MapSync(cpus=CPUS)
    s.apply(maps, compiled())
    a = STATE.containers["a"]
    e = replace(a, name="e", mac="02:00:00:00:00:0e")
    state = replace(STATE, containers={**{n: c for n, c in STATE.containers.items() if n != "a"}, "e": e},
                    mappings={k: (replace(m, container="e", backends=()) if m.container == "a" else m)
                              for k, m in STATE.mappings.items() if not m.balanced})  # fmt: skip
    log.clear()
    s.apply(maps, compiled(state, ifx={**{k: v for k, v in IFX["h1"].items() if k != a.port_name}, e.port_name: 13}))
    ops = [op for op, _n, _k in log]
    assert "delete" in ops and "update" in ops and ops.index("delete") > len(ops) - 1 - ops[::-1].index("update")


def test_a_failed_write_raises_and_the_next_pass_resumes() -> None:
    log: Log = []
    maps, s = fake_maps(log), sync.MapSync(cpus=CPUS)
    out = compiled()
    maps["blocks"].fail_after = 2
    with pytest.raises(OSError) as err:
        s.apply(maps, out)
    assert err.value.errno == errno.E2BIG and "the next pass resumes" in "".join(err.value.__notes__)
    written = len(log)
    assert ("update", "ports", next(iter(out.maps["ports"]))) not in log  # nothing after the failure
    maps["blocks"].fail_after = None
    s.apply(maps, out)
    assert contents(maps) == out.maps and set(maps["mapping_stats"].data) == out.stat_keys
    assert len(log) == sum(map(len, out.maps.values())) + len(out.stat_keys) + len(out.denied_keys)  # no write done twice
    assert written < len(log)


def test_a_map_changed_behind_its_back_is_readopted_after_forget() -> None:
    maps, s = fake_maps([]), sync.MapSync(cpus=CPUS)
    out = compiled()
    s.apply(maps, out)
    maps["ports"].data.clear()
    assert s.apply(maps, out).writes == 0  # it trusts its image (nobody else writes these maps)
    s.forget()
    assert s.apply(maps, out).added == {"ports": len(out.maps["ports"])}


def test_read_drops_sums_every_cpu() -> None:
    maps = fake_maps([])
    for reason in layout.DropReason:
        maps["drops"].data[struct.pack("=I", reason)] = b"".join(struct.pack("=QQ", reason + c, 100 * c) for c in range(CPUS))
    drops = sync.read_drops(maps)
    assert drops[layout.DropReason.REFUSED] == (9 * CPUS + 3, 300)
    assert set(drops) == set(layout.DropReason)


def test_possible_cpus_counts_ranges(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "possible"
    for text, n in (("0\n", 1), ("0-1\n", 2), ("0,2-5\n", 5), ("0-3,8-11\n", 8)):
        f.write_text(text)
        assert sync.possible_cpus(f) == n
    assert sync.percpu_size(16, 2) == 32 and sync.percpu_size(12, 4) == 64
