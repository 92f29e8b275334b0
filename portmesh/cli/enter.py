"""``portmesh exec``: enter a container's namespaces on this machine, as ``docker exec`` does.

The CLI asks the API where the container is (``status.pid`` and ``status.netns`` as its
host's agent reported them) and runs ``nsenter`` locally: every namespace of the
container's main process that differs from ours (an image container: mount, UTS, IPC,
PID, network, and user if it has one; a light container: its network namespace, and
whatever else its runtime gives it). A stopped light container keeps its named network
namespace, so it is entered by name. The lab is never involved, so any lab, or no lab,
works: only the API address matters (``--api``/``PORTMESH_API``).

Everything here is pure except :func:`ns_id` and :func:`exec_argv`: planning reads
``/proc`` through ``ns_id`` so tests can check the plan without a container.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# nsenter's flags, in the order nsenter itself enters them (user first, so the rest are permitted).
NSENTER_FLAGS = {
    "user": "--user",
    "mnt": "--mount",
    "uts": "--uts",
    "ipc": "--ipc",
    "pid": "--pid",
    "net": "--net",
    "cgroup": "--cgroup",
}
NETNS_DIR = "/run/netns"


class NotHere(Exception):
    """The container cannot be entered from this machine (the message says why, in one line)."""


@dataclass(frozen=True)
class Plan:
    """What to exec: nsenter's argv prefix, the namespaces entered, and the environment to use (None: ours)."""

    argv: list[str]
    namespaces: list[str]
    env: dict[str, str] | None = None


def ns_id(path: str) -> tuple[int, int] | None:
    """Identity of a namespace file (device, inode), or None if it is not there or not ours to see."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def netns_path(netns: str) -> str:
    """A reported namespace: a name under /run/netns (light) or a path (``/proc/PID/ns/net``, image)."""
    return netns if "/" in netns else os.path.join(NETNS_DIR, netns)


def read_environ(pid: int) -> dict[str, str] | None:
    """The environment a process started with (``/proc/PID/environ``), or None if unreadable."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def plan(container: Mapping[str, Any], ident: Callable[[str], tuple[int, int] | None] = ns_id) -> Plan:
    """How to enter ``container`` (the API's JSON for it) from here; :class:`NotHere` if it cannot be.

    A reported PID is trusted only if its network namespace is the one the agent reported:
    a PID alone could name an unrelated process on this machine when the container runs
    on another host.
    """
    name = str(container.get("name", "?"))
    host = str(container.get("host", "?"))
    status = container.get("status") or {}
    state = str(status.get("state") or "pending")
    netns = str(status.get("netns") or "")
    pid = status.get("pid")
    image = status.get("runtime") == "image" or bool(container.get("image"))  # runtime: what the agent says it used
    elsewhere = f"container {name} is on host {host}, whose namespaces are not on this machine: run exec there"
    if not netns:
        raise NotHere(f"container {name} has no namespaces to enter (state: {state}{_why(status)})")
    reported = ident(netns_path(netns))
    if reported is None:
        raise NotHere(elsewhere)
    if isinstance(pid, int) and pid > 0:
        if ident(f"/proc/{pid}/ns/net") != reported:
            raise NotHere(elsewhere)
        entered = [ns for ns in NSENTER_FLAGS if ident(f"/proc/{pid}/ns/{ns}") != ident(f"/proc/self/ns/{ns}")]
        argv = ["nsenter", f"--target={pid}", *(NSENTER_FLAGS[ns] for ns in entered)]
        if "mnt" in entered:
            argv += ["--root", "--wd"]  # the container's root and working directory, not ours
        env = read_environ(pid) if image else None
        if env is not None and "TERM" in os.environ:
            env["TERM"] = os.environ["TERM"]
        return Plan(argv, entered, env)
    if image:  # an image container's namespaces live only as long as its process
        raise NotHere(f"container {name} is not running (state: {state}{_why(status)})")
    return Plan(["nsenter", f"--net={netns_path(netns)}"], ["net"])


def _why(status: Mapping[str, Any]) -> str:
    message = str(status.get("message") or "")
    return f": {message}" if message else ""


def exec_argv(p: Plan, command: list[str]) -> None:
    """Replace this process with ``nsenter ... -- COMMAND`` (its exit status becomes ours)."""
    nsenter = shutil.which(p.argv[0])
    if nsenter is None:
        raise NotHere(f"{p.argv[0]} is not installed on this machine (util-linux)")
    argv = [nsenter, *p.argv[1:], "--", *command]
    if p.env is None:
        os.execv(nsenter, argv)
    os.execve(nsenter, argv, p.env)
