"""Processes identified by PID *and* start time, so a recycled PID is never killed.

Shared by the light runtime and the lab: both record what they started and
later stop exactly that, never anything found by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pyroute2 import netns as pr_netns


@dataclass(frozen=True)
class ProcRef:
    """A started process: its PID and the kernel's start time for it (``/proc/PID/stat`` field 22)."""

    pid: int
    start_time: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProcRef:
        return cls(int(data["pid"]), int(data["start_time"]))


def start_time_of(pid: int) -> int | None:
    """The process's start time in clock ticks, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def alive(ref: ProcRef) -> bool:
    """True if the recorded process still runs (same PID, same start time, not a zombie)."""
    return start_time_of(ref.pid) == ref.start_time


def spawn(
    argv: Sequence[str],
    log: Path,
    netns: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    setup: Callable[[], None] | None = None,
) -> ProcRef:
    """Start ``argv`` in a new session (inside ``netns`` if given), output appended to ``log``.

    The namespace is entered in the child before exec (pyroute2 ``setns`` on an fd
    opened here, so a missing namespace fails in the parent, not silently). ``setup``
    runs in the child after that, before exec (the light runtime's mount isolation);
    if it raises, the start fails in the parent with that error.
    """
    nsfd = os.open(f"/run/netns/{netns}", os.O_RDONLY) if netns else None

    def enter() -> None:
        if nsfd is not None:
            pr_netns.setns(nsfd, flags=0)
        if setup is not None:
            setup()

    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=enter,
                env=dict(env) if env is not None else None,
                cwd=cwd,
            )
    finally:
        if nsfd is not None:
            os.close(nsfd)
    started = start_time_of(proc.pid)
    # Kept so reap() can collect it once it exits: no zombies in a long-lived parent.
    _children[proc.pid] = proc
    return ProcRef(proc.pid, started if started is not None else 0)


# PID -> Popen of every child spawn() started and nobody has collected yet.
_children: dict[int, subprocess.Popen[bytes]] = {}


def reap(pid: int | None = None) -> None:
    """Collect exited children started by :func:`spawn` (no zombies in a long-lived agent).

    With ``pid``, only that child: a status check per container must not poll all of
    them (at 1,000 containers that made every agent pass O(N^2), measured: a core busy).
    """
    candidates = list(_children.values()) if pid is None else [_children[pid]] if pid in _children else []
    for proc in candidates:
        code = proc.poll()
        if code is not None:
            del _children[proc.pid]
            # Docker's convention: killed by signal N reads as 128 + N.
            _exit_codes[proc.pid] = code if code >= 0 else 128 - code


# PID -> exit code of children reaped and not yet asked about (exit_code()).
_exit_codes: dict[int, int] = {}


def exit_code(pid: int) -> int | None:
    """The exit code of a child :func:`spawn` started that has exited (once; None if unknown:
    not our child, e.g. started by an agent before a restart, or still running)."""
    reap(pid)
    return _exit_codes.pop(pid, None)


def stop(ref: ProcRef, timeout: float = 5.0) -> None:
    """Stop the recorded process and its session: SIGTERM, then SIGKILL after ``timeout``.

    Signals go to the process group the process leads (``spawn`` made it a session
    leader), and only while PID and start time still match the record.
    """
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
        if not alive(ref):
            break
        _signal(ref, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            reap(ref.pid)
            if not alive(ref):
                break
            time.sleep(0.05)
    # Stragglers of the session (children that ignored SIGTERM) die with SIGKILL to the group.
    if not alive(ref):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(ref.pid, signal.SIGKILL)
    reap()


def _signal(ref: ProcRef, sig: signal.Signals) -> None:
    try:
        if os.getpgid(ref.pid) == ref.pid:
            os.killpg(ref.pid, sig)
        else:
            os.kill(ref.pid, sig)
    except ProcessLookupError:
        pass
