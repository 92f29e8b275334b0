"""Load, pin and attach the eBPF datapath; read and write its maps.

Loading goes through libbpf (Debian's libbpf1, by ctypes): it is the maintained
loader, it relocates BTF/CO-RE, and with ``pin_root_path`` it reuses every map
declared ``LIBBPF_PIN_BY_NAME`` that is already pinned there. That is the restart
property: a new agent loads a fresh program against the old maps, every entry
still in place, and traffic never stops. Map entries are written with libbpf's
low-level calls (one syscall each). Measured here (the datapath's ``mappings``, 2
CPUs, load ~1): 272,000 updates/s and 320,000 deletes/s through this module,
740/s with ``bpftool map update`` (a process per entry), 94,000/s with ``bpftool
batch`` (one process per batch, text in, no per-entry result, nothing read back).

Attaching uses pyroute2 netlink (the project's netlink library): a clsact qdisc
and one cls_bpf direct-action filter at ingress, always at the same priority and
handle, so a new program replaces the old one in place (the kernel swaps the
program atomically: no window without a filter).
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

BPF_FS_MAGIC = 0xCAFE4A11
BPF_ANY = 0
# enum bpf_map_type values whose lookups return one value per possible CPU.
PERCPU_TYPES = frozenset({5, 6, 10})  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
LIBBPF_WARN = 0
LIBBPF_INFO = 1


class _OpenOpts(ctypes.Structure):
    """``struct bpf_object_open_opts`` of libbpf 1.1 (its ``sz`` says which fields we know)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("object_name", ctypes.c_char_p),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", ctypes.c_char_p),
        ("_removed_attach_prog_fd", ctypes.c_uint32),
        ("kconfig", ctypes.c_char_p),
        ("btf_custom_path", ctypes.c_char_p),
        ("kernel_log_buf", ctypes.c_char_p),
        ("kernel_log_size", ctypes.c_size_t),
        ("kernel_log_level", ctypes.c_uint32),
    ]


class _MapInfo(ctypes.Structure):
    """The head of ``struct bpf_map_info``: the kernel fills only as much as we ask for."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class _ProgInfo(ctypes.Structure):
    """The head of ``struct bpf_prog_info``."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8)]


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


class _Lib:
    """libbpf1's functions with their C signatures, bound once per process."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        vp, cp, i, u32p = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_uint32)
        sigs: dict[str, tuple[Any, list[Any]]] = {
            "bpf_object__open_file": (vp, [cp, ctypes.POINTER(_OpenOpts)]),
            "bpf_object__load": (i, [vp]),
            "bpf_object__close": (None, [vp]),
            "bpf_object__find_program_by_name": (vp, [vp, cp]),
            "bpf_object__find_map_by_name": (vp, [vp, cp]),
            "bpf_program__fd": (i, [vp]),
            "bpf_map__fd": (i, [vp]),
            "bpf_object__next_map": (vp, [vp, vp]),
            "bpf_map__name": (cp, [vp]),
            "bpf_map__type": (i, [vp]),
            "bpf_map__key_size": (ctypes.c_uint32, [vp]),
            "bpf_map__value_size": (ctypes.c_uint32, [vp]),
            "bpf_map__max_entries": (ctypes.c_uint32, [vp]),
            "bpf_map__map_flags": (ctypes.c_uint32, [vp]),
            "bpf_obj_get": (i, [cp]),
            "bpf_map_update_elem": (i, [i, vp, vp, ctypes.c_uint64]),
            "bpf_map_lookup_elem": (i, [i, vp, vp]),
            "bpf_map_delete_elem": (i, [i, vp]),
            "bpf_map_get_next_key": (i, [i, vp, vp]),
            "bpf_obj_get_info_by_fd": (i, [i, vp, u32p]),
            "libbpf_num_possible_cpus": (i, []),
            "libbpf_set_print": (vp, [_PRINT_FN]),
        }
        for name, (restype, argtypes) in sigs.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
        self.lib = lib
        self.cpus = lib.libbpf_num_possible_cpus()
        # libbpf prints its diagnostics (the verifier's log among them) through a callback with a
        # va_list: format them with libc's vsnprintf and keep them for the error of the load that failed.
        libc = ctypes.CDLL(None)
        libc.vsnprintf.restype = ctypes.c_int
        libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
        self.log: list[str] = []
        self.lock = threading.Lock()

        def _print(level: int, fmt: bytes, args: int) -> int:
            if level <= LIBBPF_INFO:
                buf = ctypes.create_string_buffer(4096)
                libc.vsnprintf(buf, len(buf), fmt, args)
                self.log.append(buf.value.decode(errors="replace"))
            return 0

        self.print_fn = _PRINT_FN(_print)  # kept referenced: libbpf holds the pointer
        lib.libbpf_set_print(self.print_fn)


_lib: _Lib | None = None


def _libbpf() -> _Lib:
    global _lib
    if _lib is None:
        _lib = _Lib()
    return _lib


def _check(ret: int, what: str) -> int:
    """libbpf 1.x's calls return -errno: turn that into an OSError naming ``what``."""
    if ret < 0:
        code = -ret
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return ret


def _is_bpffs(path: Path) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86_64; f_type comes first
    if libc.statfs(str(path).encode(), buf) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"statfs {path}: {os.strerror(code)}")
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF == BPF_FS_MAGIC


def ensure_bpffs(path: Path) -> None:
    """Make ``path`` a bpffs (mkdir -p, mount) unless it already is one (or lies on one).

    ``ip netns exec`` remounts /sys, so /sys/fs/bpf is no bpffs inside a lab namespace:
    every agent pins under its own mount.
    """
    path.mkdir(parents=True, exist_ok=True)
    if _is_bpffs(path):
        return
    done = subprocess.run(["mount", "-t", "bpf", "bpf", str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise OSError(errno.EIO, f"mount -t bpf bpf {path}: {done.stderr.strip()}")


class BpfMap:
    """A map by file descriptor (this object owns the fd): bytes in, bytes out.

    Keys and values are the C structs' bytes (``bytes(layout.X(...))``); a value shorter
    than ``value_size`` is refused rather than padded, so a layout drift fails loudly.
    Per-CPU maps: ``update`` takes one value (written to every CPU) or all CPUs' values
    back to back; ``lookup`` and ``items`` return all CPUs' values back to back
    (each ``value_size`` rounded up to 8 bytes), ``lookup_percpu`` splits them.
    """

    def __init__(self, fd: int, name: str | None = None) -> None:
        self.fd = fd
        info = _MapInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        try:
            _check(_libbpf().lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), f"map info {name}")
        except OSError:
            os.close(fd)
            raise
        self.name = name or info.name.decode()
        self.type = int(info.type)
        self.id = int(info.id)
        self.key_size = int(info.key_size)
        self.value_size = int(info.value_size)
        self.max_entries = int(info.max_entries)
        self.percpu = self.type in PERCPU_TYPES
        self.cpus = _libbpf().cpus
        self._slot = (self.value_size + 7) // 8 * 8
        self._buf_size = self._slot * self.cpus if self.percpu else self.value_size

    def _key(self, key: bytes) -> ctypes.Array[ctypes.c_char]:
        key = bytes(key)
        if len(key) != self.key_size:
            raise ValueError(f"map {self.name}: key is {len(key)} bytes, the map's key_size is {self.key_size}")
        return ctypes.create_string_buffer(key, self.key_size)

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        value = bytes(value)
        if self.percpu and len(value) == self.value_size:
            value = value.ljust(self._slot, b"\0") * self.cpus
        if len(value) != self._buf_size:
            raise ValueError(f"map {self.name}: value is {len(value)} bytes, expected {self._buf_size}")
        k, v = self._key(key), ctypes.create_string_buffer(value, len(value))
        _check(_libbpf().lib.bpf_map_update_elem(self.fd, k, v, flags), f"update map {self.name}")

    def delete(self, key: bytes) -> bool:
        ret = _libbpf().lib.bpf_map_delete_elem(self.fd, self._key(key))
        if ret == -errno.ENOENT:
            return False
        _check(ret, f"delete from map {self.name}")
        return True

    def lookup(self, key: bytes) -> bytes | None:
        k, v = self._key(key), ctypes.create_string_buffer(self._buf_size)
        ret = _libbpf().lib.bpf_map_lookup_elem(self.fd, k, v)
        if ret == -errno.ENOENT:
            return None
        _check(ret, f"lookup in map {self.name}")
        return v.raw

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        """One value per possible CPU (per-CPU maps only)."""
        if not self.percpu:
            raise ValueError(f"map {self.name} is not per-CPU")
        raw = self.lookup(key)
        return None if raw is None else self.split(raw)

    def split(self, raw: bytes) -> list[bytes]:
        """A per-CPU map's value buffer as one ``value_size`` slice per CPU."""
        return [raw[i * self._slot : i * self._slot + self.value_size] for i in range(self.cpus)]

    def keys(self) -> Iterator[bytes]:
        """Every key, from a snapshot taken first: the caller may delete while iterating.

        The kernel walks a hash map from a given key; when that key is gone (deleted by us
        or by the program meanwhile) it starts over from the first, so a lazy walk could
        repeat keys or never end. The snapshot skips keys it has already seen.
        """
        lib = _libbpf().lib
        cur: ctypes.Array[ctypes.c_char] | None = None
        nxt = ctypes.create_string_buffer(self.key_size)
        seen: set[bytes] = set()
        snapshot: list[bytes] = []
        for _step in range(4 * self.max_entries + 16):  # restarts under heavy churn cannot loop for ever
            ret = lib.bpf_map_get_next_key(self.fd, cur, nxt)
            if ret == -errno.ENOENT:
                break
            _check(ret, f"iterate map {self.name}")
            key = nxt.raw
            if key not in seen:
                seen.add(key)
                snapshot.append(key)
            cur = ctypes.create_string_buffer(key, self.key_size)
        yield from snapshot

    def __iter__(self) -> Iterator[bytes]:
        return self.keys()

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes | bytearray | ctypes.Structure) and self.lookup(bytes(key)) is not None

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:  # deleted between the two calls
                yield key, value

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> BpfMap:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BpfMap({self.name!r}, type={self.type}, key={self.key_size}, value={self.value_size}, fd={self.fd})"


def open_map(pin_dir: Path, name: str) -> BpfMap:
    """A map pinned by ``load`` (under ``pin_dir/maps``), for readers that did not load the object."""
    path = pin_dir / "maps" / name
    fd = _check(_libbpf().lib.bpf_obj_get(str(path).encode()), f"open pinned map {name} at {path}")
    return BpfMap(fd, name)


class Loaded:
    """A loaded object: its programs' fds (valid until ``close``) and its maps."""

    def __init__(self, obj: int, path: Path) -> None:
        self.replaced: list[str] = []  # maps pinned with another definition, created afresh by this load
        self._obj: int | None = obj
        self.path = path
        self._maps: dict[str, BpfMap] = {}

    def _handle(self) -> int:
        if self._obj is None:
            raise ValueError(f"object {self.path} is closed")
        return self._obj

    def program_fd(self, name: str) -> int:
        """The fd of the program whose C function is ``name`` (e.g. ``pm_from_container``)."""
        lib = _libbpf().lib
        prog = lib.bpf_object__find_program_by_name(self._handle(), name.encode())
        if not prog:
            raise KeyError(f"no program {name!r} in {self.path}")
        return _check(lib.bpf_program__fd(prog), f"program {name}")

    def map(self, name: str) -> BpfMap:
        """The map ``name`` (shared by the object: closed with it)."""
        if name not in self._maps:
            lib = _libbpf().lib
            handle = lib.bpf_object__find_map_by_name(self._handle(), name.encode())
            if not handle:
                raise KeyError(f"no map {name!r} in {self.path}")
            fd = _check(lib.bpf_map__fd(handle), f"map {name}")
            self._maps[name] = BpfMap(os.dup(fd), name)
        return self._maps[name]

    def close(self) -> None:
        """Release our fds; pinned maps and attached programs stay in the kernel."""
        for m in self._maps.values():
            m.close()
        self._maps.clear()
        if self._obj is not None:
            _libbpf().lib.bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self) -> Loaded:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def load(obj: Path, pin_dir: Path) -> Loaded:
    """Open and load ``obj``; its pinned maps are reused from ``pin_dir/maps`` or created and pinned there.

    ``pin_dir`` must lie on a bpffs (``ensure_bpffs``). A map pinned by another version of the
    program with another definition (a table grown by a new drop reason, say) cannot be reused:
    its pin is removed first, so the load creates and pins it afresh, and ``Loaded.replaced``
    names it (the caller refills state maps from the store; a counter map restarts at zero).
    The old program keeps its own reference to the old map until the new one replaces it.
    """
    b = _libbpf()
    maps_dir = pin_dir / "maps"
    maps_dir.mkdir(parents=True, exist_ok=True)
    opts = _OpenOpts(sz=ctypes.sizeof(_OpenOpts), pin_root_path=str(maps_dir).encode())
    with b.lock:
        b.log.clear()
        handle = b.lib.bpf_object__open_file(str(obj).encode(), ctypes.byref(opts))
        if not handle:
            code = ctypes.get_errno() or errno.EINVAL
            raise OSError(code, f"open eBPF object {obj}: {os.strerror(code)}\n{''.join(b.log).strip()}")
        try:
            replaced = _unpin_incompatible(b, handle, maps_dir)
        except OSError:
            b.lib.bpf_object__close(handle)
            raise
        ret = b.lib.bpf_object__load(handle)
        if ret < 0:
            b.lib.bpf_object__close(handle)
            raise OSError(-ret, f"load eBPF object {obj}: {os.strerror(-ret)}\n{''.join(b.log).strip()}")
    loaded = Loaded(handle, obj)
    loaded.replaced = replaced
    return loaded


def _definition(b: _Lib, m: int) -> tuple[int, int, int, int, int]:
    """What libbpf requires of a pinned map to reuse it (its map_is_reuse_compat): type, key and
    value sizes, entries, flags."""
    lib = b.lib
    return (lib.bpf_map__type(m), lib.bpf_map__key_size(m), lib.bpf_map__value_size(m),
            lib.bpf_map__max_entries(m), lib.bpf_map__map_flags(m))  # fmt: skip


def _pinned_definition(b: _Lib, path: Path) -> tuple[int, int, int, int, int] | None:
    """The definition of the map pinned at ``path``, or None if nothing is pinned there."""
    fd = b.lib.bpf_obj_get(str(path).encode())
    if fd < 0:
        code = ctypes.get_errno()
        if code == errno.ENOENT:
            return None
        raise OSError(code, f"open pinned map {path}: {os.strerror(code)}")
    try:
        info = _MapInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        _check(b.lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), f"read map info of {path}")
        return (info.type, info.key_size, info.value_size, info.max_entries, info.map_flags)
    finally:
        os.close(fd)


def _unpin_incompatible(b: _Lib, handle: int, maps_dir: Path) -> list[str]:
    """Remove the pins of maps whose pinned definition differs from the object's; their names."""
    replaced: list[str] = []
    m = b.lib.bpf_object__next_map(handle, None)
    while m:
        name = (b.lib.bpf_map__name(m) or b"").decode()
        path = maps_dir / name
        if name and not name.startswith(".") and path.exists():
            pinned = _pinned_definition(b, path)
            if pinned is not None and pinned != _definition(b, m):
                path.unlink()
                replaced.append(name)
        m = b.lib.bpf_object__next_map(handle, m)
    return replaced


def program_id(prog_fd: int) -> int:
    """The kernel's id of a loaded program: what a tc filter reports, so attach can compare."""
    info = _ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_libbpf().lib.bpf_obj_get_info_by_fd(prog_fd, ctypes.byref(info), ctypes.byref(size)), f"program fd {prog_fd}")
    return int(info.id)


# Our filter's fixed place at ingress: a new program replaces the one there in place.
INGRESS = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
EGRESS = 0xFFFFFFF3
FILTER_PRIO = 1
FILTER_HANDLE = 1
TCA_BPF_FLAG_ACT_DIRECT = 1


def _teach_pyroute2_bpf_id() -> None:
    """Make pyroute2 decode cls_bpf's program id.

    pyroute2 0.9.7 attaches cls_bpf filters fine, but its table of the filter's options
    stops at TCA_BPF_FLAGS, so the program id (TCA_BPF_ID) a dump carries comes back as
    UNKNOWN. Append the three missing attributes (linux/pkt_cls.h) and have the class
    recompile its table; a pyroute2 that knows them already is left alone.
    """
    from pyroute2.netlink.rtnl.tcmsg import sched_bpf

    names = [item[0] for item in sched_bpf.options.nla_map]
    if "TCA_BPF_ID" in names:
        return
    if names[-1] != "TCA_BPF_FLAGS":  # a layout we do not know: do not guess
        raise RuntimeError(f"pyroute2's cls_bpf options table is unexpected: {names}")
    sched_bpf.options.nla_map = (
        *sched_bpf.options.nla_map,
        ("TCA_BPF_FLAGS_GEN", "uint32"),
        ("TCA_BPF_TAG", "hex"),
        ("TCA_BPF_ID", "uint32"),
    )
    sched_bpf.options._nlmsg_base__compiled_nla = False


def _netlink(what: str, exc: NetlinkError) -> OSError:
    return OSError(exc.code, f"{what}: {os.strerror(exc.code)}")


def _filters(ipr: IPRoute, ifindex: int, parent: int) -> list[dict[str, int]]:
    """The cls_bpf filters under ``parent``: prio, handle, info, program id and flags of each."""
    _teach_pyroute2_bpf_id()
    found = []
    for msg in ipr.get_filters(index=ifindex, parent=parent):
        opts = msg.get_attr("TCA_OPTIONS")
        if msg.get_attr("TCA_KIND") != "bpf" or opts is None:  # the dump's per-prio header has no options
            continue
        found.append(
            {
                "prio": msg["info"] >> 16,
                "handle": msg["handle"],
                "info": msg["info"],
                "id": opts.get_attr("TCA_BPF_ID") or 0,
                "flags": opts.get_attr("TCA_BPF_FLAGS") or 0,
            }
        )
    return found


def _has_clsact(ipr: IPRoute, ifindex: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=ifindex))


def _attach(ipr: IPRoute, ifindex: int, prog_fd: int, name: str, want: int) -> bool:
    changed = False
    if not _has_clsact(ipr, ifindex):
        ipr.tc("add", "clsact", ifindex)
        changed = True
    filters = _filters(ipr, ifindex, INGRESS)
    ours = [f for f in filters if (f["prio"], f["handle"]) == (FILTER_PRIO, FILTER_HANDLE)]
    if len(filters) == 1 and ours and ours[0]["id"] == want and ours[0]["flags"] & TCA_BPF_FLAG_ACT_DIRECT:
        return changed
    # Replacing the filter at our handle swaps the program atomically: no frame meets no program.
    ipr.tc(
        "replace-filter", "bpf", ifindex, handle=FILTER_HANDLE, parent=INGRESS, prio=FILTER_PRIO,
        fd=prog_fd, name=name, direct_action=True,
    )  # fmt: skip
    for f in filters:  # anything else at ingress (an older layout's filter) would run before or after ours
        if (f["prio"], f["handle"]) != (FILTER_PRIO, FILTER_HANDLE):
            ipr.tc("del-filter", "bpf", ifindex, handle=f["handle"], parent=INGRESS, info=f["info"])
    return True


def attach(ifindex: int, prog_fd: int, name: str) -> bool:
    """Run ``prog_fd`` at ``ifindex``'s ingress (this namespace); True if that changed anything.

    Idempotent: with the same program (by id) already there, nothing is touched.
    """
    want = program_id(prog_fd)
    with IPRoute() as ipr:
        try:
            return _attach(ipr, ifindex, prog_fd, name, want)
        except NetlinkError as exc:
            raise _netlink(f"attach {name} at ingress of ifindex {ifindex}", exc) from exc


def detach(ifindex: int) -> bool:
    """Remove the ingress filters (and the clsact qdisc once it holds none); True if anything was there.

    A port that no longer exists has nothing attached: False.
    """
    with IPRoute() as ipr:
        try:
            if not _has_clsact(ipr, ifindex):
                return False
            for f in _filters(ipr, ifindex, INGRESS):
                ipr.tc("del-filter", "bpf", ifindex, handle=f["handle"], parent=INGRESS, info=f["info"])
            if not _filters(ipr, ifindex, EGRESS):
                ipr.tc("del", "clsact", ifindex)
            return True
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise _netlink(f"detach from ifindex {ifindex}", exc) from exc


def attached(ifindex: int) -> int | None:
    """The id of the program at ``ifindex``'s ingress (ours: the first if several), or None."""
    with IPRoute() as ipr:
        try:
            if not _has_clsact(ipr, ifindex):
                return None
            filters = _filters(ipr, ifindex, INGRESS)
        except NetlinkError as exc:
            raise _netlink(f"tc filters of ifindex {ifindex}", exc) from exc
    return filters[0]["id"] if filters else None
