"""The ``--ha`` lab's control plane: a 3-member Raft store and two controllers, in the mgmt namespace.

The store is made exactly as docs/deploy.md section 9 makes one on real machines, with
portmesh's own commands: ``create-cluster`` for member 1, ``join-cluster`` for members 2
and 3 (offline, before any server runs), then ``serve`` on each. Every client lists all three
members and follows the leader: the controllers and the agents over TCP
(``services.cluster_tcp_remote``), the API, which runs outside the mgmt namespace, by the
members' unix sockets (``services.cluster_unix_remote``).

Who leads is read from each member's own ``cluster/status`` (``ovs-appctl``), never guessed.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from portmesh.lab import services
from portmesh.lab.state import LabState, Process
from portmesh.runtime import procs

POLL_S = 0.05


class ClusterError(Exception):
    """The store cluster could not be made or did not form (one line)."""


@dataclass
class MemberStatus:
    """One member as it describes itself (``cluster/status``); ``role`` empty if it did not answer."""

    member: int
    role: str = ""  # leader, follower, candidate
    status: str = ""  # "cluster member", "joining cluster", ...
    term: int = 0
    servers: int = 0  # members it knows of
    error: str = ""

    @property
    def member_of_cluster(self) -> bool:
        return self.status == "cluster member"


def parse_cluster_status(member: int, text: str) -> MemberStatus:
    """Read ``ovs-appctl cluster/status`` output (ovsdb/raft.c's format) into a :class:`MemberStatus`."""

    def field(name: str) -> str:
        m = re.search(rf"^{name}: (.*)$", text, re.M)
        return m[1].strip() if m else ""

    servers = text.partition("\nServers:\n")[2]
    term = field("Term")
    return MemberStatus(
        member,
        role=field("Role"),
        status=field("Status"),
        term=int(term) if term.isdigit() else 0,
        servers=len(re.findall(r"^\s+[0-9a-f]{4} \(", servers, re.M)),
    )


def member_status(labdir: Path, member: int) -> MemberStatus:
    """Member ``member``'s view of the cluster, asked on its unixctl socket."""
    ctl = services.member_ctl(labdir, member)
    try:
        out = subprocess.run(
            ["ovs-appctl", "-t", str(ctl), "cluster/status", services.STORE_DB_NAME],
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return MemberStatus(member, error=str(exc))
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        return MemberStatus(member, error=lines[-1] if lines else f"ovs-appctl exited {out.returncode}")
    return parse_cluster_status(member, out.stdout)


def members(state: LabState) -> list[MemberStatus]:
    """Every member's status (a dead member answers nothing: its ``error`` says so)."""
    out = []
    for n in range(1, services.STORE_MEMBERS + 1):
        proc = state.process(services.member_label(n))
        if proc is None or not procs.alive(proc.ref):
            out.append(MemberStatus(n, error="not running"))
        else:
            out.append(member_status(state.dir, n))
    return out


def leader(state: LabState) -> int | None:
    """The member that says it leads (the highest term wins if two say so during an election)."""
    leaders = [m for m in members(state) if m.role == "leader"]
    return max(leaders, key=lambda m: m.term).member if leaders else None


def wait_formed(state: LabState, expect: int = services.STORE_MEMBERS, timeout: float = 30.0) -> int:
    """Wait until ``expect`` running members are cluster members that know every member and one leads; the leader."""
    deadline = time.monotonic() + timeout
    while True:
        seen = members(state)
        ok = [m for m in seen if m.member_of_cluster and m.servers == services.STORE_MEMBERS]
        lead = leader(state)
        if len(ok) >= expect and lead is not None:
            return lead
        if time.monotonic() > deadline:
            detail = "; ".join(f"store-{m.member}: {m.error or m.status or '?'} {m.role}".strip() for m in seen)
            raise ClusterError(f"the store cluster did not form within {timeout:.0f} s ({detail})")
        time.sleep(POLL_S)


def wait_member_rejoined(state: LabState, member: int, timeout: float = 30.0) -> None:
    """Wait until ``member`` is back in the cluster and follows (or leads) a known leader."""
    deadline = time.monotonic() + timeout
    while True:
        st = member_status(state.dir, member)
        if st.member_of_cluster and st.role in ("leader", "follower") and leader(state) is not None:
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"store-{member} did not rejoin within {timeout:.0f} s ({st.error or st.status} {st.role})")
        time.sleep(POLL_S)


def make_cluster(state: LabState) -> None:
    """Create member 1's database as a new cluster and join members 2 and 3 to it (offline, as deploy.md does)."""
    labdir = state.dir
    steps = [services.create_cluster_argv(labdir)]
    steps += [services.join_cluster_argv(labdir, n) for n in range(2, services.STORE_MEMBERS + 1)]
    for argv in steps:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise ClusterError(f"{' '.join(argv[2:4])}: {lines[-1] if lines else f'exit {done.returncode}'}")


def controller_state(proc: Process) -> str:
    """``master``, ``standby`` or ``""`` (unknown): the last role line in the controller's log.

    The controller says ``became master (epoch N)`` when it takes over and ``became standby`` /
    ``standby: ... is master`` when another instance is master.
    """
    try:
        text = Path(proc.log).read_text(errors="replace")
    except FileNotFoundError:
        return ""
    last = ""
    for m in re.finditer(r"became master|became standby|standby: ", text):
        last = "master" if m[0] == "became master" else "standby"
    return last
