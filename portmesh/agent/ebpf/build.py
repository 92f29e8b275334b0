"""Compile the eBPF datapath into an object file, once per source version.

The agent compiles on its own host (clang + libbpf's headers are installed there)
instead of shipping a prebuilt object, so the program always matches the header
the Python side mirrors. The object is cached under a name derived from the
sources' hash: a restarted agent reuses it in milliseconds, a changed source gets
a new file. Several agents may compile at once: each writes a temporary file and
renames it into place, so a reader never sees half an object.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "datapath.bpf.c"
DEFAULT_CACHE = Path("/var/cache/portmesh/ebpf")
CLANG = "clang"
# Debian keeps <asm/types.h> (pulled in by <linux/types.h>) under the multiarch directory, which clang's
# BPF target does not search by itself.
CFLAGS = ("-O2", "-g", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu")


class BuildError(RuntimeError):
    """The datapath did not compile; the message carries clang's diagnostics."""


def source_hash(source: Path = SOURCE) -> str:
    """16 hex digits of sha256 over the source and the headers beside it (``datapath.h``).

    Every header in the source's directory counts, so a change to the shared layout
    recompiles even though the ``.c`` file did not change.
    """
    digest = hashlib.sha256()
    for path in [source, *sorted(source.parent.glob("*.h"))]:
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def object_path(cache_dir: Path | None = None, source: Path = SOURCE) -> Path:
    """The compiled object for ``source``, compiling it only if the cache does not hold this version.

    ``source`` defaults to the datapath; tests pass their own small programs.
    """
    cache = cache_dir if cache_dir is not None else DEFAULT_CACHE
    if not source.is_file():
        raise BuildError(f"eBPF source {source} does not exist")
    target = cache / f"{source.name.removesuffix('.bpf.c').removesuffix('.c')}-{source_hash(source)}.o"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=cache)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        cmd = [CLANG, *CFLAGS, f"-I{source.parent}", "-c", str(source), "-o", str(tmp)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except FileNotFoundError as exc:
            raise BuildError(f"cannot compile {source}: {CLANG} is not installed ({exc})") from exc
        if done.returncode != 0:
            raise BuildError(f"clang failed to compile {source} (exit {done.returncode}):\n{done.stderr.strip()}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
