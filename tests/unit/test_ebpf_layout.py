"""The eBPF layout contract and the object cache, checked without loading anything.

``layout.py`` mirrors ``datapath.h`` by hand; these tests read the compiled object's
BTF (what the kernel and libbpf see) and compare every struct in ``layout.STRUCTS``
field by field, so the two cannot drift apart silently. The cache tests prove that
``object_path`` compiles once per source version: a restarted agent must not wait
for clang, and a changed header must not reuse a stale object.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from portmesh.agent.ebpf import build, layout

needs_clang = pytest.mark.skipif(shutil.which(build.CLANG) is None, reason="clang is not installed (./run installs it)")
needs_bpftool = pytest.mark.skipif(shutil.which("bpftool") is None, reason="bpftool is not installed (./run installs it)")

# A translation unit that only instantiates every struct of the header, so its BTF holds them all
# even before (or without) the datapath program.
PROBE = """#include "datapath.h"
{decls}
char LICENSE[] __attribute__((section("license"), used)) = "GPL";
"""


def btf_structs(obj: Path) -> dict[str, tuple[int, dict[str, int]]]:
    """struct name -> (size, {field: byte offset}), from ``bpftool btf dump file OBJ format raw``."""
    out = subprocess.run(["bpftool", "btf", "dump", "file", str(obj), "format", "raw"],
                         capture_output=True, text=True, check=True).stdout
    structs: dict[str, tuple[int, dict[str, int]]] = {}
    current: dict[str, int] | None = None
    for line in out.splitlines():
        head = re.match(r"\[\d+\] STRUCT '(\w+)' size=(\d+) vlen=\d+", line)
        if head:
            current = {}
            structs[head.group(1)] = (int(head.group(2)), current)
            continue
        member = re.match(r"\s+'(\w*)' type_id=\d+ bits_offset=(\d+)", line)
        if member and current is not None:
            current[member.group(1)] = int(member.group(2)) // 8
        elif not line.startswith((" ", "\t")):
            current = None
    return structs


def assert_layout_matches(obj: Path) -> None:
    structs = btf_structs(obj)
    problems = []
    for c_name, py in layout.STRUCTS.items():
        if c_name not in structs:
            problems.append(f"struct {c_name}: not in the object's BTF")
            continue
        size, fields = structs[c_name]
        if size != ctypes.sizeof(py):
            problems.append(f"struct {c_name}: {size} bytes in C, {ctypes.sizeof(py)} in layout.{py.__name__}")
        py_fields = {name: getattr(py, name).offset for name, *_ in py._fields_}
        if fields != py_fields:
            problems.append(f"struct {c_name}: C fields {fields} != layout.{py.__name__} {py_fields}")
    assert not problems, "\n".join(problems)


@needs_clang
@needs_bpftool
def test_header_structs_match_layout(tmp_path: Path) -> None:
    """datapath.h itself, compiled for BPF: every struct's size and field offsets equal layout.py's."""
    probe = tmp_path / "probe.bpf.c"
    decls = "\n".join(f"struct {name} probe_{name} __attribute__((used));" for name in layout.STRUCTS)
    probe.write_text(PROBE.format(decls=decls))
    shutil.copy(build.HERE / "datapath.h", tmp_path / "datapath.h")
    assert_layout_matches(build.object_path(tmp_path / "cache", source=probe))


@needs_clang
@needs_bpftool
def test_datapath_object_matches_layout(tmp_path: Path) -> None:
    """The real object (datapath.bpf.c, as the agent builds it): the maps' structs as the program sees them."""
    if not build.SOURCE.exists():
        pytest.skip(f"{build.SOURCE.name} is not written yet (the header is checked by the probe test)")
    assert_layout_matches(build.object_path(tmp_path))


@needs_clang
def test_object_path_reuses_the_cache_and_recompiles_on_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src_dir, cache = tmp_path / "src", tmp_path / "cache"
    src_dir.mkdir()
    source = src_dir / "tiny.bpf.c"
    header = src_dir / "tiny.h"
    header.write_text("#define TINY 1\n")
    source.write_text('#include "tiny.h"\nint tiny(void) { return TINY; }\n')

    first = build.object_path(cache, source=source)
    assert first.is_file() and first.parent == cache
    assert re.fullmatch(r"tiny-[0-9a-f]{16}\.o", first.name), first.name
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temporary file left behind
    stamp = first.stat().st_mtime_ns

    # Cached: no compiler is even run (a missing one would fail).
    monkeypatch.setattr(build, "CLANG", "/nonexistent/clang")
    assert build.object_path(cache, source=source) == first
    assert first.stat().st_mtime_ns == stamp
    monkeypatch.undo()

    # A header change alone is a new version: a new object, the old one untouched.
    header.write_text("#define TINY 2\n")
    second = build.object_path(cache, source=source)
    assert second != first and second.is_file() and first.stat().st_mtime_ns == stamp

    # The source changed back: the first object is found again.
    header.write_text("#define TINY 1\n")
    assert build.object_path(cache, source=source) == first


@needs_clang
def test_compile_error_raises_build_error_with_clang_output(tmp_path: Path) -> None:
    source = tmp_path / "broken.bpf.c"
    source.write_text("int broken(void) { return undeclared_name; }\n")
    with pytest.raises(build.BuildError, match="undeclared_name"):
        build.object_path(tmp_path / "cache", source=source)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written is cached


def test_missing_source_raises_build_error(tmp_path: Path) -> None:
    with pytest.raises(build.BuildError, match="does not exist"):
        build.object_path(tmp_path, source=tmp_path / "absent.bpf.c")
