"""Lab nodes: a network namespace, and commands run inside one.

Namespaces are made with pyroute2 (no ``ip netns``); a command enters its
namespace in the child before exec, so nothing the lab starts ever runs in the
machine's own network namespace unless asked to (the API, on loopback).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns


def names() -> list[str]:
    """Every named network namespace on the machine (``/run/netns``)."""
    return [str(n) for n in pr_netns.listnetns()]


def exists(name: str) -> bool:
    return name in names()


def create(name: str) -> None:
    """Create namespace ``name`` with its loopback up; it must not exist yet (names are per lab)."""
    if exists(name):
        raise FileExistsError(f"network namespace {name} already exists")
    pr_netns.create(name)
    with IPRoute(netns=name, flags=0) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def remove(name: str) -> None:
    """Remove namespace ``name`` if it exists."""
    if exists(name):
        pr_netns.remove(name)


def _path(netns: str) -> str:
    """A namespace by name (``/run/netns``) or by path (an image container's ``/proc/PID/ns/net``)."""
    return netns if "/" in netns else f"/run/netns/{netns}"


def _enter(netns: str | None) -> None:
    if netns is not None:
        with open(_path(netns), "rb") as ns:
            pr_netns.setns(ns.fileno(), flags=0)


def run(
    argv: Sequence[str], netns: str | None = None, env: Mapping[str, str] | None = None, check: bool = True, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run a short command (``ovsdb-tool``, ``ovs-vsctl``) inside ``netns`` and wait for it."""
    if netns is not None and not os.path.exists(_path(netns)):
        raise FileNotFoundError(f"network namespace {netns} does not exist")
    return subprocess.run(
        list(argv),
        env=dict(env) if env is not None else None,
        check=check,
        timeout=timeout,
        capture_output=True,
        text=True,
        preexec_fn=(lambda: _enter(netns)) if netns else None,
    )


def exec_in(netns: str, argv: Sequence[str]) -> None:
    """Replace this process with ``argv`` running inside ``netns`` (interactive ``lab exec``)."""
    _enter(netns)
    os.execvp(argv[0], list(argv))
