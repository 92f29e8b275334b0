"""The eBPF loader on a real kernel: libbpf load and pin, map operations, restart, tc attach.

Uses a tiny object of its own (``data/mini.bpf.c``: one pinned map of every kind the
datapath uses, two pass-everything tc programs), so the loader is proven apart from
the datapath. Everything happens under names unique to this run: two network
namespaces ``pl<pid>-a``/``-b`` joined by a veth pair, and a bpffs mounted under
/run/portmesh/test-<pid>/ (unmounted at the end, also on failure).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from portmesh.agent.ebpf import build, loader

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, bpffs, bpf())"),
    pytest.mark.skipif(shutil.which(build.CLANG) is None, reason="clang is not installed (./run installs it)"),
]

DATA = Path(__file__).parent / "data"
CLONE_NEWNET = 0x40000000


@dataclass
class Env:
    prefix: str
    ns_a: str
    ns_b: str
    pins: Path
    obj: Path
    ifindex: int  # of the veth end in ns_a, whose ingress the tests attach to


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


@contextmanager
def netns(name: str) -> Iterator[None]:
    """Run the block in network namespace ``name`` (this thread), then return to ours."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back home")
    finally:
        os.close(target)
        os.close(home)


def mounts_at(path: Path) -> int:
    return sum(1 for line in Path("/proc/self/mountinfo").read_text().splitlines() if line.split()[4] == str(path))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    pid = os.getpid()
    prefix = f"pl{pid % 10000}-"
    ns_a, ns_b = f"{prefix}a", f"{prefix}b"
    root = Path(f"/run/portmesh/test-{pid}")
    pins = root / "bpf"
    try:
        sh("ip", "netns", "add", ns_a)
        sh("ip", "netns", "add", ns_b)
        sh("ip", "-n", ns_a, "link", "add", f"{prefix}va", "type", "veth", "peer", "name", f"{prefix}vb", "netns", ns_b)
        sh("ip", "-n", ns_a, "addr", "add", "198.18.0.1/30", "dev", f"{prefix}va")
        sh("ip", "-n", ns_b, "addr", "add", "198.18.0.2/30", "dev", f"{prefix}vb")
        sh("ip", "-n", ns_a, "link", "set", f"{prefix}va", "up")
        sh("ip", "-n", ns_b, "link", "set", f"{prefix}vb", "up")
        ifindex = int(sh("ip", "netns", "exec", ns_a, "cat", f"/sys/class/net/{prefix}va/ifindex"))
        obj = build.object_path(tmp_path_factory.mktemp("ebpf-cache"), source=DATA / "mini.bpf.c")
        loader.ensure_bpffs(pins)
        yield Env(prefix, ns_a, ns_b, pins, obj, ifindex)
    finally:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        while mounts_at(pins):
            subprocess.run(["umount", str(pins)], check=True)
        shutil.rmtree(root, ignore_errors=True)


def u32(n: int) -> bytes:
    return struct.pack("=I", n)


def lpm(prefixlen: int, ip: str) -> bytes:
    return struct.pack("=I", prefixlen) + bytes(int(x) for x in ip.split("."))


def counter(packets: int, nbytes: int) -> bytes:
    return struct.pack("=QQ", packets, nbytes)


def test_ensure_bpffs_mounts_once(env: Env) -> None:
    assert mounts_at(env.pins) == 1
    loader.ensure_bpffs(env.pins)
    loader.ensure_bpffs(env.pins / "sub")  # inside a bpffs already: a plain directory, no new mount
    assert mounts_at(env.pins) == 1 and mounts_at(env.pins / "sub") == 0
    assert "bpf" in sh("stat", "-f", "-c", "%T", str(env.pins))


def test_maps_of_every_kind(env: Env) -> None:
    with loader.load(env.obj, env.pins) as loaded:
        assert sorted(p.name for p in (env.pins / "maps").iterdir()) == sorted(
            ["mini_hash", "mini_lpm", "mini_array", "mini_percpu", "seen", "mini_lru"])

        h = loaded.map("mini_hash")
        assert (h.key_size, h.value_size, h.percpu) == (4, 8, False)
        for i in range(5):
            h.update(u32(i), struct.pack("=Q", i * 100))
        assert h.lookup(u32(3)) == struct.pack("=Q", 300)
        assert h.lookup(u32(99)) is None
        assert sorted(h.keys()) == sorted(u32(i) for i in range(5))
        assert dict(h.items())[u32(4)] == struct.pack("=Q", 400)
        assert h.delete(u32(3)) is True and h.delete(u32(3)) is False
        assert h.lookup(u32(3)) is None and len(list(h.keys())) == 4
        assert u32(4) in h and u32(3) not in h
        for key in h:  # deleting while iterating: every key once, nothing left
            assert h.delete(key) is True
        assert list(h.keys()) == []
        for i in range(5):
            h.update(u32(i), struct.pack("=Q", i * 100))
        with pytest.raises(ValueError, match="mini_hash: key is 2 bytes"):
            h.lookup(b"\0\0")
        with pytest.raises(OSError) as exc:  # BPF_NOEXIST on a present key
            h.update(u32(1), struct.pack("=Q", 1), flags=1)
        assert exc.value.errno == errno.EEXIST and "mini_hash" in str(exc.value)

        trie = loaded.map("mini_lpm")
        trie.update(lpm(15, "198.18.0.0"), u32(1))
        trie.update(lpm(24, "198.18.7.0"), u32(2))
        assert trie.lookup(lpm(32, "198.18.7.9")) == u32(2)  # the longest prefix wins
        assert trie.lookup(lpm(32, "198.19.1.1")) == u32(1)
        assert trie.lookup(lpm(32, "203.0.113.1")) is None
        assert sorted(trie.keys()) == sorted([lpm(15, "198.18.0.0"), lpm(24, "198.18.7.0")])
        assert trie.delete(lpm(24, "198.18.7.0")) is True
        assert trie.lookup(lpm(32, "198.18.7.9")) == u32(1)

        arr = loaded.map("mini_array")
        arr.update(u32(2), u32(7))
        assert arr.lookup(u32(2)) == u32(7) and arr.lookup(u32(0)) == u32(0)
        assert [k for k, _ in arr.items()] == [u32(i) for i in range(4)]  # an array has every index
        with pytest.raises(OSError) as exc:
            arr.update(u32(4), u32(1))  # past max_entries
        assert exc.value.errno == errno.E2BIG and "mini_array" in str(exc.value)
        with pytest.raises(OSError, match="mini_array"):
            arr.delete(u32(2))  # array entries cannot be deleted

        pc = loaded.map("mini_percpu")
        assert pc.percpu and pc.value_size == 16 and pc.cpus >= 1
        pc.update(u32(1), counter(3, 300))  # one value: written for every CPU
        assert pc.lookup_percpu(u32(1)) == [counter(3, 300)] * pc.cpus
        values = [counter(i, 10 * i) for i in range(pc.cpus)]
        pc.update(u32(2), b"".join(values))  # every CPU's own value
        assert pc.lookup_percpu(u32(2)) == values
        assert pc.lookup_percpu(u32(9)) is None
        assert sorted(pc.keys()) == [u32(1), u32(2)]
        assert pc.delete(u32(1)) is True
        with pytest.raises(ValueError, match="mini_percpu: value is 3 bytes"):
            pc.update(u32(1), b"abc")

        lru = loaded.map("mini_lru")
        lru.update(u32(5), u32(6))
        assert lru.lookup(u32(5)) == u32(6)

        seen = loaded.map("seen")
        assert seen.percpu and seen.lookup_percpu(u32(0)) is not None


def test_reload_keeps_every_entry(env: Env) -> None:
    """The restart property: a second load of the object reuses the pinned maps, entries and all."""
    with loader.load(env.obj, env.pins) as first:
        first.map("mini_hash").update(u32(42), struct.pack("=Q", 4242))
        first.map("mini_lpm").update(lpm(16, "198.19.0.0"), u32(9))
        first.map("mini_percpu").update(u32(42), counter(1, 2))
        ids = {name: first.map(name).id for name in ("mini_hash", "mini_lpm", "mini_percpu")}
        before = dict(first.map("mini_hash").items())
    with loader.load(env.obj, env.pins) as second:
        assert {name: second.map(name).id for name in ids} == ids  # the same kernel maps, not copies
        assert dict(second.map("mini_hash").items()) == before
        assert second.map("mini_lpm").lookup(lpm(32, "198.19.3.4")) == u32(9)
        assert second.map("mini_percpu").lookup_percpu(u32(42)) == [counter(1, 2)] * second.map("mini_percpu").cpus
    # A reader that never loaded the object opens the pin by name.
    with loader.open_map(env.pins, "mini_hash") as m:
        assert m.name == "mini_hash" and m.lookup(u32(42)) == struct.pack("=Q", 4242)
    with pytest.raises(OSError) as exc:
        loader.open_map(env.pins, "no_such_map")
    assert exc.value.errno == errno.ENOENT and "no_such_map" in str(exc.value)


def test_load_errors_name_the_object(env: Env, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.o"
    bogus.write_bytes(b"not an ELF file")
    with pytest.raises(OSError, match=r"open eBPF object .*bogus\.o"):
        loader.load(bogus, env.pins)
    with loader.load(env.obj, env.pins) as loaded, pytest.raises(KeyError, match="no_such_prog"):
        loaded.program_fd("no_such_prog")


def test_pinned_map_with_another_definition_is_replaced(env: Env, tmp_path: Path) -> None:
    """An upgrade that changes a map's definition (a table grown by a new drop reason) loads: that map's
    pin is replaced by a fresh map, named in ``replaced``; every other pinned map is reused, entries and
    all; a second load of the same object replaces nothing."""
    with loader.load(env.obj, env.pins) as first:
        assert first.replaced == []
        first.map("mini_hash").update(u32(7), struct.pack("=Q", 77))
        first.map("mini_lpm").update(lpm(16, "198.19.0.0"), u32(5))
        lpm_id = first.map("mini_lpm").id
    source = tmp_path / "mini.bpf.c"
    text = (DATA / "mini.bpf.c").read_text()
    assert text.count("__uint(max_entries, 1024);") == 1
    source.write_text(text.replace("__uint(max_entries, 1024);", "__uint(max_entries, 2048);"))
    changed = build.object_path(tmp_path / "cache", source=source)
    with loader.load(changed, env.pins) as upgraded:
        assert upgraded.replaced == ["mini_hash"]
        assert upgraded.map("mini_hash").max_entries == 2048 and upgraded.map("mini_hash").lookup(u32(7)) is None
        assert upgraded.map("mini_lpm").id == lpm_id and upgraded.map("mini_lpm").lookup(lpm(32, "198.19.1.1")) == u32(5)
    with loader.open_map(env.pins, "mini_hash") as m:
        assert m.max_entries == 2048  # the pin now names the new map
    with loader.load(changed, env.pins) as again:
        assert again.replaced == []
    with loader.load(env.obj, env.pins) as back:  # and back again (a downgrade), for the tests after this one
        assert back.replaced == ["mini_hash"]


def ping(env: Env) -> None:
    subprocess.run(["ip", "netns", "exec", env.ns_b, "ping", "-c", "1", "-W", "2", "-q", "198.18.0.1"],
                   capture_output=True, check=True)


def seen_packets(env: Env, slot: int = 0) -> int:
    """Frames counted by pm_pass (slot 0) or pm_pass_too (slot 1), all CPUs."""
    with loader.open_map(env.pins, "seen") as seen:
        slots = seen.lookup_percpu(u32(slot)) or []
    return sum(struct.unpack("=QQ", s)[0] for s in slots)


def rx_packets(ifindex: int) -> int:
    """Frames the veth end received (each one passes its tc ingress): call inside its namespace."""
    with IPRoute() as ipr:
        (link,) = ipr.get_links(ifindex)
    return int(link.get_attr("IFLA_STATS64")["rx_packets"])


def ingress_filters(env: Env) -> list[str]:
    out = sh("ip", "netns", "exec", env.ns_a, "tc", "filter", "show", "dev", f"{env.prefix}va", "ingress")
    return [line for line in out.splitlines() if "handle" in line]


def test_attach_idempotent_replace_detach(env: Env) -> None:
    with loader.load(env.obj, env.pins) as loaded, netns(env.ns_a):
        fd, other = loaded.program_fd("pm_pass"), loaded.program_fd("pm_pass_too")
        pid, other_id = loader.program_id(fd), loader.program_id(other)
        assert pid != other_id
        assert loader.attached(env.ifindex) is None

        assert loader.attach(env.ifindex, fd, "pm_pass") is True
        assert loader.attached(env.ifindex) == pid
        filters = ingress_filters(env)
        assert len(filters) == 1 and "direct-action" in filters[0] and f"id {pid}" in filters[0]

        # The program really runs: it counts what arrives at ingress (control: no count without traffic).
        count = seen_packets(env)
        ping(env)
        assert seen_packets(env) > count

        assert loader.attach(env.ifindex, fd, "pm_pass") is False  # same program: nothing touched
        assert ingress_filters(env) == filters

        assert loader.attach(env.ifindex, other, "pm_pass_too") is True  # replaced in place
        assert loader.attached(env.ifindex) == other_id
        filters = ingress_filters(env)
        assert len(filters) == 1 and f"id {other_id}" in filters[0]
        count, count_too = seen_packets(env), seen_packets(env, 1)
        ping(env)  # pm_pass_too runs now, pm_pass no longer
        assert seen_packets(env) == count and seen_packets(env, 1) > count_too

        # A stray filter at another priority is removed when ours is (re)placed.
        with IPRoute() as ipr:
            ipr.tc("add-filter", "bpf", env.ifindex, handle=1, parent=loader.INGRESS, prio=7, fd=fd, name="stray",
                   direct_action=True)
        assert len(ingress_filters(env)) == 2
        assert loader.attach(env.ifindex, other, "pm_pass_too") is True
        assert len(ingress_filters(env)) == 1 and loader.attached(env.ifindex) == other_id

        assert loader.attach(env.ifindex, fd, "pm_pass") is True
    # The filter holds the program: it stays attached after the loader closed the object (agent exit).
    with netns(env.ns_a):
        assert loader.attached(env.ifindex) == pid
        count = seen_packets(env)
        ping(env)
        assert seen_packets(env) > count

        assert loader.detach(env.ifindex) is True
        assert loader.attached(env.ifindex) is None
        assert "clsact" not in sh("tc", "qdisc", "show", "dev", f"{env.prefix}va")
        assert loader.detach(env.ifindex) is False
        ping(env)  # traffic still flows without the program


def swap_under_flood(env: Env, progs: list[tuple[int, str]], atomic: bool) -> tuple[int, tuple[int, int], int]:
    """Flood-ping the veth end while swapping programs; (frames received, counted by each program, swaps)."""
    loader.attach(env.ifindex, *progs[0])
    before = rx_packets(env.ifindex), seen_packets(env, 0), seen_packets(env, 1)
    flood = subprocess.Popen(["ip", "netns", "exec", env.ns_b, "ping", "-f", "-q", "-c", "10000", "198.18.0.1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    swaps = 0
    try:
        while flood.poll() is None:
            if not atomic:
                loader.detach(env.ifindex)
            assert loader.attach(env.ifindex, *progs[(swaps + 1) % 2]) is True
            swaps += 1
    finally:
        if flood.poll() is None:
            flood.kill()
        _, err = flood.communicate(timeout=30)
    assert flood.returncode == 0, err
    received = rx_packets(env.ifindex) - before[0]
    counted = (seen_packets(env, 0) - before[1], seen_packets(env, 1) - before[2])
    return received, counted, swaps


def test_replace_under_traffic_leaves_no_window(env: Env) -> None:
    """Swapping the program while frames arrive: every frame received met one of the two programs.

    A flood ping arrives at the veth end while attach swaps the programs back and forth; the
    frames both programs counted add up exactly to the frames the interface received. Control:
    the same flood with detach + attach as the swap shows frames that met no program, so the
    count would see a window if attach had one.
    """
    with loader.load(env.obj, env.pins) as loaded, netns(env.ns_a):
        progs = [(loaded.program_fd("pm_pass"), "pm_pass"), (loaded.program_fd("pm_pass_too"), "pm_pass_too")]
        try:
            received, counted, swaps = swap_under_flood(env, progs, atomic=True)
            c_received, c_counted, c_swaps = swap_under_flood(env, progs, atomic=False)
        finally:
            loader.detach(env.ifindex)
    assert received >= 10000 and swaps >= 10, (received, swaps)
    assert counted[0] > 0 and counted[1] > 0, counted  # both programs really ran during the flood
    assert sum(counted) == received, f"{received} frames received, {counted} counted over {swaps} swaps"
    assert c_swaps >= 10 and sum(c_counted) < c_received, f"control: {c_received} received, {c_counted} counted"
