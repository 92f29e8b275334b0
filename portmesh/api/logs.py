"""Reading a container's output for ``GET /v1/containers/{name}/logs``.

The agent reports, in the container's status, the file its runtime writes the
container's output to (the light runtime: one file per container under the
agent's state directory). The API runs on the same machine in the embedded
deployment, so it reads that file directly; a status without a path, or a path
this machine cannot read, is answered 404 naming ``logs``. Reads are bounded:
at most ``MAX_CHUNK`` bytes per answer, and the answer carries the offset to ask
from next, which is how ``portmesh logs -f`` follows.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from portmesh.model.errors import NotFound

MAX_CHUNK = 1 << 20
TAIL_WINDOW = 1 << 20  # --tail looks at most this far back


@dataclass(frozen=True)
class LogChunk:
    """Text read from the log and the offset just after it."""

    path: str
    offset: int
    text: str


def read_log(name: str, path: str, offset: int = 0, tail: int | None = None) -> LogChunk:
    """From ``offset`` (or the last ``tail`` lines) to at most ``MAX_CHUNK`` bytes further. Blocking."""
    if not path:
        raise NotFound("logs", f"container {name!r} has no log file reported by its host (yet)")
    log = Path(path)
    try:
        with log.open("rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise NotFound("logs", f"{path} is not a regular file")
            size = st.st_size
            if tail is not None:
                start = max(0, size - TAIL_WINDOW)
                f.seek(start)
                lines = f.read(size - start).splitlines(keepends=True)
                data = b"".join(lines[-tail:]) if tail else b""
                return LogChunk(path, size, data.decode(errors="replace"))
            start = offset if offset <= size else 0  # shorter than the offset: truncated, read it anew
            f.seek(start)
            data = f.read(min(MAX_CHUNK, size - start))
    except FileNotFoundError:
        raise NotFound("logs", f"container {name!r}'s log {path} is not on this machine") from None
    except PermissionError:
        raise NotFound("logs", f"container {name!r}'s log {path} is not readable here") from None
    return LogChunk(path, start + len(data), data.decode(errors="replace"))
