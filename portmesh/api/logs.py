"""Reading a container's output for ``GET /v1/containers/{name}/logs``.

The agent reports, in the container's status, the file its runtime writes the
container's output to (the light runtime: ``<state dir>/logs/<name>.log``; an
image container: the engine's own log file). The API runs on the same machine in
the embedded deployment, so it reads that file directly.

The path comes from the store, and whoever can write a status row could name any
file (``/run/portmesh/<lab>/api.token``): the path is resolved (symlinks, ``..``)
and read only if it lies under a log directory of a runtime (:data:`LOG_DIRS`,
plus the directories the API was configured with) and is a regular ``*.log``
file. Refusals never repeat the path. Reads are bounded: at most ``MAX_CHUNK``
bytes per answer, and the answer carries the offset to ask from next, which is
how ``portmesh logs -f`` follows.

Podman writes its ``k8s-file`` format (``TIME STREAM F|P text`` per line) and
Docker its ``json-file`` format (one JSON object per line): :func:`plain_lines`
turns both back into the container's own text, as ``docker logs`` shows it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from portmesh.model.errors import NotFound

MAX_CHUNK = 1 << 20
TAIL_WINDOW = 1 << 20  # --tail looks at most this far back

# Where runtimes keep containers' output; ``*`` is one path segment. The light runtime's
# logs under its state dir (production default and the lab's), Docker's json-file logs,
# Podman's (root) container storage.
LOG_DIRS: tuple[str, ...] = (
    "/var/lib/portmesh/agent/*/logs",
    "/run/portmesh/*/*/agent/logs",
    "/var/lib/docker/containers",
    "/var/lib/containers/storage",
    "/run/containers/storage",
)


@dataclass(frozen=True)
class LogChunk:
    """Text read from the log and the offset just after it."""

    path: str
    offset: int
    text: str


def _under(path: Path, pattern: str) -> bool:
    """True if ``path`` lies strictly below a directory matching ``pattern`` (``*`` = one segment)."""
    want = Path(pattern).parts
    have = path.parts
    return len(have) > len(want) and all(fnmatch.fnmatchcase(h, w) for h, w in zip(have, want, strict=False))


def allowed_log(path: str, log_dirs: Sequence[str] = ()) -> Path | None:
    """The resolved log file if it may be served (a ``*.log`` under a runtime's log directory), else None."""
    try:
        resolved = Path(path).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if resolved.suffix != ".log":
        return None
    patterns = [*LOG_DIRS, *(str(Path(d).resolve()) for d in log_dirs)]
    return resolved if any(_under(resolved, p) for p in patterns) else None


def read_log(name: str, path: str, offset: int = 0, tail: int | None = None, log_dirs: Sequence[str] = ()) -> LogChunk:
    """From ``offset`` (or the last ``tail`` lines) to at most ``MAX_CHUNK`` bytes further. Blocking."""
    if not path:
        raise NotFound("logs", f"container {name!r} has no log file reported by its host (yet)")
    log = allowed_log(path, log_dirs)
    if log is None:
        # Missing, or outside every runtime's log directory: the same answer, and no path in it.
        raise NotFound("logs", f"container {name!r}'s log is not readable on the API's machine")
    try:
        fd = os.open(log, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        raise NotFound("logs", f"container {name!r}'s log is not readable on the API's machine") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise NotFound("logs", f"container {name!r}'s log is not a regular file")
        size = st.st_size
        if tail is not None:
            start = max(0, size - TAIL_WINDOW)
            f.seek(start)
            lines = f.read(size - start).splitlines(keepends=True)
            data = b"".join(lines[-tail:]) if tail else b""
            return LogChunk(path, size, _text(log, data))
        start = offset if offset <= size else 0  # shorter than the offset: truncated, read it anew
        f.seek(start)
        data = f.read(min(MAX_CHUNK, size - start))
        # Stop at the last whole line, so an engine's line prefix is never cut in two between answers.
        if b"\n" in data and start + len(data) < size:
            data = data[: data.rindex(b"\n") + 1]
    return LogChunk(path, start + len(data), _text(log, data))


def _text(log: Path, data: bytes) -> str:
    """Decoded output; an engine's log (Podman ``ctr.log``, Docker ``*-json.log``) freed of its line prefixes."""
    text = data.decode(errors="replace")
    return plain_lines(text) if log.name == "ctr.log" or log.name.endswith("-json.log") else text


# Podman's k8s-file line: RFC 3339 time, stream, F (full line) or P (partial: no newline follows).
_K8S_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\S+ (?:stdout|stderr) ([FP]) ?(.*)$")


def plain_lines(text: str) -> str:
    """The container's own output: each line freed of its engine's prefix (k8s-file, json-file).

    Text that is not in an engine's format (the light runtime writes raw output) is
    returned unchanged, line for line.
    """
    out: list[str] = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\n")
        k8s = _K8S_LINE.match(body)
        if k8s is not None:
            out.append(k8s.group(2) + ("\n" if k8s.group(1) == "F" else ""))
            continue
        if body.startswith('{"log":'):
            try:
                entry = json.loads(body)
            except ValueError:
                entry = None
            if isinstance(entry, dict) and isinstance(entry.get("log"), str):
                out.append(entry["log"])
                continue
        out.append(line)
    return "".join(out)
