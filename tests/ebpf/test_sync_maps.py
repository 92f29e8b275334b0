"""The map sync against the datapath's real maps (loaded and pinned by the loader): contents, restart, scale.

The datapath object is built into this run's own cache and loaded with its maps pinned in a
bpffs mounted under /run/portmesh/test-sync-<pid>/ (unmounted at the end, also on failure);
no network namespace is needed, nothing is attached. Checked: after a pass every map holds
exactly the compiled image (LPM tries give their keys back as written), counters are
created zeroed on every CPU, the tries answer the program's lookups (a port inside a block
finds its owner, one outside does not), an agent restart against the pinned maps writes
nothing and keeps the counters, one changed mapping is one write, and a 100,000-mapping
image is written, then re-adopted with no write, in bounded time (printed with -s).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from portmesh.agent.ebpf import build, layout, loader, sync
from portmesh.agent.ebpf import compile as ec
from portmesh.model.entities import Container, DesiredState, Host, HostRole, Mapping, MappingKey, PortBlock, Proto, mac_for
from tests.unit.test_ebpf_compile import IFX, STATE

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (bpffs, bpf())"),
    pytest.mark.skipif(shutil.which(build.CLANG) is None, reason="clang is not installed (./run installs it)"),
]

NAMES = (*layout.MAPS, *layout.STAT_MAPS)


@pytest.fixture(scope="module")
def obj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build.object_path(tmp_path_factory.mktemp("ebpf-cache"))


@pytest.fixture
def pins() -> Iterator[Path]:
    """A bpffs of this test's own, unmounted and removed whatever happens."""
    root = Path(f"/run/portmesh/test-sync-{os.getpid()}")
    pin_dir = root / "bpf"
    try:
        loader.ensure_bpffs(pin_dir)
        yield pin_dir
    finally:
        if any(line.split()[4] == str(pin_dir) for line in Path("/proc/self/mountinfo").read_text().splitlines()):
            subprocess.run(["umount", str(pin_dir)], check=True)
        shutil.rmtree(root, ignore_errors=True)


def opened(loaded: loader.Loaded) -> dict[str, loader.BpfMap]:
    return {name: loaded.map(name) for name in NAMES}


def held(maps: dict[str, loader.BpfMap]) -> dict[str, dict[bytes, bytes]]:
    return {name: dict(maps[name].items()) for name in layout.MAPS}


def test_a_pass_fills_every_map_and_a_restart_writes_nothing(obj: Path, pins: Path) -> None:
    out = ec.MapCompiler("h1").compile(STATE, IFX["h1"])
    k80 = MappingKey(IPv4Address("203.0.113.10"), Proto.TCP, 80)
    with loader.load(obj, pins) as loaded:
        maps = opened(loaded)
        done = sync.MapSync().apply(maps, out)
        assert held(maps) == out.maps
        assert done.writes == sum(map(len, out.maps.values())) + len(out.stat_keys) + len(out.denied_keys)
        stats = maps["mapping_stats"]
        assert set(stats.keys()) == out.stat_keys
        assert all(v == bytes(16) for k in out.stat_keys for v in stats.lookup_percpu(k) or [b"missing"])
        # The tries answer as the program asks: a full-length key, longest prefix wins.
        a = STATE.containers["a"]
        inside = bytes(layout.BlockKey(48, layout.be32(a.ips[0]), layout.be16(a.block.start + 17)))
        outside = bytes(layout.BlockKey(48, layout.be32(a.ips[0]), layout.be16(a.block.start - 1)))
        assert maps["blocks"].lookup(inside) == ec.dest(a.mac, layout.DEST_LOCAL, 11, 11)
        assert maps["blocks"].lookup(outside) != ec.dest(a.mac, layout.DEST_LOCAL, 11, 11)
        kind = maps["networks"].lookup(bytes(layout.NetKey(32, layout.be32(IPv4Address("198.19.7.7")))))
        assert kind == ec._U32.pack(layout.NET_PROTECTED)
        # The program counts (two CPUs' worth, as it would add them).
        stats.update(ec.mapping_key(k80), b"".join(bytes(layout.Counter(2, 200)) for _ in range(stats.cpus)))
        assert sync.read_drops(maps) == {r: (0, 0) for r in layout.DropReason}
    with loader.load(obj, pins) as loaded:  # the agent restarts: a new object against the pinned maps
        maps = opened(loaded)
        s = sync.MapSync()
        assert s.apply(maps, ec.MapCompiler("h1").compile(STATE, IFX["h1"])).writes == 0
        assert sync.read_counters(maps, k80) == (2 * maps["mapping_stats"].cpus, 200 * maps["mapping_stats"].cpus)
        moved = replace(STATE, mappings={**STATE.mappings, k80: Mapping(k80, "b")})
        done = s.apply(maps, ec.MapCompiler("h1").compile(moved, IFX["h1"]))
        assert (done.writes, done.changed) == (1, {"mappings": 1})
        assert maps["mappings"].lookup(ec.mapping_key(k80)) == ec.dest(STATE.containers["b"].mac, layout.DEST_LOCAL, 12, 12)
        assert sync.read_counters(maps, k80)[0] == 2 * maps["mapping_stats"].cpus  # the same mapping key: kept


def big_state(containers: int = 1000, mappings: int = 100_000) -> DesiredState:
    """Two hosts, ``containers`` spread over them sharing 250 addresses, ``mappings`` spread over the containers."""
    hosts = {"h1": Host("h1", 1, IPv4Address("198.19.0.1"), HostRole.GATEWAY),
             "h2": Host("h2", 2, IPv4Address("198.19.0.2"), HostRole.COMPUTE)}  # fmt: skip
    cs: dict[str, Container] = {}
    for i in range(containers):
        name = f"c{i}"
        ip = IPv4Address(f"203.0.113.{i % 250 + 1}")
        cs[name] = Container(name, f"h{i % 2 + 1}", mac_for(name), (ip,), PortBlock(32768 + (i // 250) * 1024, 1024))
    ms: dict[MappingKey, Mapping] = {}
    per = mappings // containers
    for i in range(containers):
        c = cs[f"c{i}"]
        for j in range(per):
            key = MappingKey(c.ips[0], Proto.TCP if j % 2 else Proto.UDP, 1 + (i // 250) * 8000 + j)
            ms[key] = Mapping(key, c.name)
    return DesiredState(hosts=hosts, containers=cs, mappings=ms)


def test_100k_mappings_written_then_readopted_with_no_write(obj: Path, pins: Path) -> None:
    state = big_state()
    ifx = {c.port_name: 100 + i for i, c in enumerate(state.containers_on("h1"))}
    ifx[state.hosts["h2"].tunnel_port] = 5
    compiler = ec.MapCompiler("h1")
    t0 = time.perf_counter()
    out = compiler.compile(state, ifx)
    t1 = time.perf_counter()
    with loader.load(obj, pins) as loaded:
        maps = opened(loaded)
        s = sync.MapSync()
        first = s.apply(maps, out)
        t2 = time.perf_counter()
        again = sync.MapSync().apply(maps, out)  # a restarted agent: reads every map back, writes nothing
        t3 = time.perf_counter()
        key = next(iter(state.mappings))
        changed = compiler.compile(replace(state, mappings={**state.mappings, key: Mapping(key, "c2")}), ifx)
        t4 = time.perf_counter()
        done = s.apply(maps, changed)
        t5 = time.perf_counter()
    print(f"\n100k mappings / 1k containers: compile {t1 - t0:.3f} s, first pass {t2 - t1:.3f} s "
          f"({first.writes} writes), restart pass {t3 - t2:.3f} s (0 writes), "
          f"one change: compile {(t4 - t3) * 1000:.1f} ms + sync {(t5 - t4) * 1000:.1f} ms ({done.writes} write)")  # fmt: skip
    assert len(out.maps["mappings"]) == 100_000 and first.writes > 100_000
    assert again.writes == 0 and done.writes == 1
    assert t5 - t3 < 0.5
