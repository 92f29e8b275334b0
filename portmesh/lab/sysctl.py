"""Machine-wide sysctls that labs change, shared by every lab up at once: the last one down puts them back.

A setting like ``net.core.rmem_default`` exists only in the machine's initial
namespace. Recording "the value before" per lab breaks as soon as two labs
overlap: the second sees the first one's value, and the first one's ``down``
would put the old value back under the second (whose new OVS ports then get
the small socket buffer). So the original value and the labs holding the
setting live in one registry under ``/run/portmesh``, changed under a lock;
a holder whose state directory is gone (a lab that crashed) no longer counts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from portmesh.lab.state import RUN_ROOT, lab_dir

REGISTRY = RUN_ROOT / "machine-sysctls.json"  # {key: {"original": value, "holders": [lab names]}}
LOCK = RUN_ROOT / "machine-sysctls.lock"


def path_of(key: str) -> Path:
    return Path("/proc/sys") / key.replace(".", "/")


def read(key: str) -> str:
    return path_of(key).read_text().strip()


@contextlib.contextmanager
def _registry() -> Iterator[dict[str, Any]]:
    """The registry, locked against other labs for the duration; saved on leaving."""
    RUN_ROOT.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data: dict[str, Any] = json.loads(REGISTRY.read_text()) if REGISTRY.exists() else {}
            yield data
            tmp = REGISTRY.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=2))
            os.replace(tmp, REGISTRY)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _alive(lab: str) -> bool:
    return (lab_dir(lab) / "lab.json").exists()


def hold(key: str, value: str, lab: str) -> str | None:
    """Set ``key`` to ``value`` for ``lab``; returns the machine's original value, or None if nothing was changed.

    None means the value was already ``value`` with no lab holding it (the operator's own
    setting): then no lab ever puts anything back.
    """
    with _registry() as data:
        entry = data.get(key)
        current = read(key)
        if entry is None:
            if current == value:
                return None
            entry = data[key] = {"original": current, "holders": []}
        if current != value:
            path_of(key).write_text(value)
        entry["holders"] = sorted({h for h in entry["holders"] if _alive(h)} | {lab})
        return str(entry["original"])


def release(key: str, lab: str, original: str) -> bool:
    """``lab`` no longer needs ``key``; put ``original`` back if no other lab that is up holds it. True if put back."""
    with _registry() as data:
        entry = data.get(key)
        if entry is not None:
            holders = [h for h in entry["holders"] if h != lab and _alive(h)]
            if holders:
                entry["holders"] = holders
                return False
            original = str(entry["original"])
            del data[key]
        path_of(key).write_text(original)
        return True


def registered(key: str) -> tuple[str, list[str]] | None:
    """The machine's original value of ``key`` and the labs holding it now, if any lab changed it."""
    with _registry() as data:
        entry = data.get(key)
        return (str(entry["original"]), [h for h in entry["holders"] if _alive(h)]) if entry else None
