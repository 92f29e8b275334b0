"""Fault injection in a running lab (issue 13 item 8): for users' own drills and for the fault tests.

Each fault kills exactly the process the lab recorded (PID *and* start time, never a name),
starts it again the way ``lab up`` did (:meth:`Lab.restart`), and waits until the component
is really back, so the lab stays whole and the report says how long recovery took:

- ``kill-controller``: back when every host's switch has reconnected (the controller's log
  says so per datapath); the flow-mods it sent since its restart are counted from its log
  (a restart that changes nothing must send none).
- ``restart-switch HOST``: ``ovs-vswitchd`` loses its flows; back when the controller has
  re-installed them (its log line for that datapath).
- ``kill-agent HOST``: back when the new agent has started (store, and OVSDB on an OVS host).

Times come from this process's monotonic clock, polling the logs every 20 ms.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from portmesh.lab import ha, services
from portmesh.lab.network import Lab, host_index
from portmesh.lab.state import LabState, Process
from portmesh.runtime import procs

POLL_S = 0.02
# The controller's log lines (controller/service.py, controller/switch.py) these waits read.
CONNECTED_RE = re.compile(r"switch ([0-9a-f]{16}) connected from .* with (\d+) flows")
ECHO_DROP_RE = re.compile(r"switch ([0-9a-f]{16}) \(.*\): no reply to an echo request")
FLOWS_RE = re.compile(r"switch ([0-9a-f]{16}): (\d+) flows added, (\d+) deleted")


class FaultError(Exception):
    """The fault could not be injected or the component did not come back (one line for the CLI)."""


@dataclass
class FaultReport:
    """What a fault did and how long recovery took (seconds from the restart of the component)."""

    fault: str
    target: str
    old_pid: int
    new_pid: int
    signal: str
    down_s: float  # from the signal until the old process was gone
    restart_s: float  # from then until the new process was started (and, for OVS, answering)
    back_s: float  # from the restart until the component was back (see the module docstring)
    flow_mods: int = 0  # flow-mods the controller logged between the restart and "back"
    details: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the numbers do not say (who led, who took over)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def lines(self) -> list[str]:
        if self.fault == "freeze-switch":
            return self._freeze_lines()
        out = [
            f"{self.target}: pid {self.old_pid} got SIG{self.signal}, gone after {self.down_s:.2f} s; "
            f"restarted as pid {self.new_pid} in {self.restart_s:.2f} s",
            f"{self.target}: back {self.back_s:.2f} s after its restart",
        ]
        since = "the kill" if self.fault == "kill-store-member" or self.target.startswith("controller-") else "the restart"
        out += [f"  {what}: {secs:.2f} s after {since}" for what, secs in self.details.items()]
        if self.fault in ("kill-controller", "restart-switch"):
            out.append(f"  flow-mods sent by the controller meanwhile: {self.flow_mods}")
        return out + [f"  {note}" for note in self.notes]

    def _freeze_lines(self) -> list[str]:
        dropped = self.details.get("dropped by echo")
        how = (f"the controller dropped it by echo {dropped:.2f} s after the freeze" if dropped is not None
               else f"the controller did not drop it by echo within {self.restart_s:.2f} s")
        out = [
            f"{self.target}: pid {self.old_pid} got SIGSTOP; {how}",
            f"{self.target}: SIGCONT after {self.restart_s:.2f} s; back (reconnected and programmed) "
            f"{self.back_s:.2f} s later",
        ]
        out += [f"  {what}: {secs:.2f} s" for what, secs in self.details.items() if what != "dropped by echo"]
        out.append(f"  flow-mods sent to the switch meanwhile: {self.flow_mods}")
        return out


def _state(lab: Lab) -> LabState:
    state = lab.state()
    if state is None:
        raise FaultError(f"lab {lab.name} is not up")
    return state


def _ovs_host(lab: Lab, state: LabState, host: str) -> None:
    """``host`` is one of the lab's hosts and runs OVS (the switch faults need an ovs-vswitchd)."""
    if host not in state.hosts:
        raise FaultError(f"HOST: lab {lab.name} has no host {host!r} (hosts: {', '.join(state.hosts)})")
    if state.datapath(host) != "ovs":
        raise FaultError(f"HOST: {host} runs the {state.datapath(host)} datapath, it has no ovs-vswitchd "
                         "(its datapath lives in the kernel; kill-agent restarts what drives it)")


def _process(state: LabState, label: str) -> Process:
    proc = state.process(label)
    if proc is None:
        raise FaultError(f"lab {state.name} has no {label} process")
    return proc


def _kill(proc: Process, sig: signal.Signals, timeout: float) -> float:
    """Signal exactly the recorded process and wait until it is gone; seconds it took."""
    start = time.monotonic()
    ref = proc.ref
    if procs.alive(ref):
        os.kill(ref.pid, sig)
    while procs.alive(ref):
        procs.reap(ref.pid)  # our own child (a test that started the lab in-process): no zombie
        if time.monotonic() - start > timeout:
            break  # Lab.restart escalates (SIGTERM, then SIGKILL)
        time.sleep(POLL_S)
    return time.monotonic() - start


def _log_size(path: str) -> int:
    try:
        return Path(path).stat().st_size
    except FileNotFoundError:
        return 0


def _log_since(path: str, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _wait(what: str, probe: Callable[[], bool], timeout: float, ref: procs.ProcRef | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if ref is not None and not procs.alive(ref):
            raise FaultError(f"{what}: the restarted process (pid {ref.pid}) exited")
        if time.monotonic() > deadline:
            raise FaultError(f"{what}: not within {timeout:.0f} s")
        time.sleep(POLL_S)


def flow_mods_in(text: str) -> int:
    """Flow-mods (adds and deletes) the controller logged in ``text``."""
    return sum(int(m[2]) + int(m[3]) for m in FLOWS_RE.finditer(text))


def _dpid(host: str) -> str:
    return f"{host_index(host):016x}"  # the lab registers host hN with datapath id N


def kill_controller(
    lab: Lab, sig: signal.Signals = signal.SIGKILL, timeout: float = 30.0, which: str = "master"
) -> FaultReport:
    """Kill the controller with ``sig``, start it again, wait until every switch has reconnected.

    On an ``--ha`` lab ``which`` (``master``, ``standby``, ``1`` or ``2``) picks one of the two:
    see :func:`kill_ha_controller`.
    """
    state = _state(lab)
    if state.ha:
        return kill_ha_controller(lab, state, which, sig, timeout)
    if which != "master":
        raise FaultError(f"--which: lab {lab.name} has one controller (no --ha): there is no {which!r} to choose")
    old = _process(state, "controller")
    down = _kill(old, sig, timeout=10.0)
    ctl_log = old.log
    offset = _log_size(ctl_log)
    t0 = time.monotonic()
    new = lab.restart("controller")
    restart = time.monotonic() - t0
    t0 = time.monotonic()
    # Only OVS hosts have a switch to reconnect; an eBPF host's agent fills its maps itself.
    pending = {_dpid(h): h for h in state.hosts if state.datapath(h) == "ovs"}
    details: dict[str, float] = {}

    def reconnected() -> bool:
        for m in CONNECTED_RE.finditer(_log_since(ctl_log, offset)):
            host = pending.pop(m[1], None)
            if host is not None:
                details[f"switch {host} reconnected"] = time.monotonic() - t0
        return not pending

    _wait(f"controller: switches {', '.join(sorted(pending.values()))} reconnecting", reconnected, timeout, new.ref)
    back = time.monotonic() - t0
    mods = flow_mods_in(_log_since(ctl_log, offset))
    return FaultReport("kill-controller", "controller", old.pid, new.pid, sig.name.removeprefix("SIG"), down, restart, back,
                       mods, details)


def restart_switch(lab: Lab, host: str, timeout: float = 30.0) -> FaultReport:
    """Kill ``host``'s ovs-vswitchd (SIGKILL: a crash), start it again, wait until its flows are back."""
    state = _state(lab)
    _ovs_host(lab, state, host)
    label = f"ovs-vswitchd:{host}"
    old = _process(state, label)
    ctl = state.process("controller")
    down = _kill(old, signal.SIGKILL, timeout=10.0)
    offset = _log_size(ctl.log) if ctl is not None else 0
    t0 = time.monotonic()
    new = lab.restart(label)
    restart = time.monotonic() - t0
    t0 = time.monotonic()
    details: dict[str, float] = {}
    if ctl is None:
        return FaultReport("restart-switch", label, old.pid, new.pid, "KILL", down, restart, 0.0)
    dpid = _dpid(host)

    def programmed() -> bool:
        text = _log_since(ctl.log, offset)
        if "connected" not in details and any(m[1] == dpid for m in CONNECTED_RE.finditer(text)):
            details["connected"] = time.monotonic() - t0
        if "connected" in details and any(m[1] == dpid for m in FLOWS_RE.finditer(text)):
            details["flows installed"] = time.monotonic() - t0
            return True
        return False

    _wait(f"{label}: the controller re-installing its flows", programmed, timeout, new.ref)
    back = time.monotonic() - t0
    mods = flow_mods_in(_log_since(ctl.log, offset))
    return FaultReport("restart-switch", label, old.pid, new.pid, "KILL", down, restart, back, mods, details)


def kill_agent(lab: Lab, host: str, timeout: float = 30.0) -> FaultReport:
    """Kill ``host``'s agent (SIGKILL), start it again, wait until it says it has started."""
    state = _state(lab)
    if host not in state.hosts:
        raise FaultError(f"HOST: lab {lab.name} has no host {host!r} (hosts: {', '.join(state.hosts)})")
    label = f"agent:{host}"
    old = _process(state, label)
    down = _kill(old, signal.SIGKILL, timeout=10.0)
    offset = _log_size(old.log)
    t0 = time.monotonic()
    new = lab.restart(label)
    restart = time.monotonic() - t0
    t0 = time.monotonic()
    line = f"agent for host {host} started"
    _wait(f"{label}: starting", lambda: line in _log_since(old.log, offset), timeout, new.ref)
    back = time.monotonic() - t0
    return FaultReport("kill-agent", label, old.pid, new.pid, "KILL", down, restart, back)


def controllers(state: LabState) -> list[Process]:
    """The lab's controller processes: ``controller``, or ``controller-1`` and ``controller-2`` with --ha."""
    return [p for p in state.processes if p.label == "controller" or p.label.startswith("controller-")]


def _switch_status(lab: Lab, state: LabState, host: str) -> dict[str, object]:
    """The host's switch status in the store, read through the API (what ``portmesh host show`` prints)."""
    if not state.api_url:
        return {}
    try:
        status = lab.api(state).http.get(f"/v1/hosts/{host}").json().get("status") or {}
    except (OSError, ValueError):  # the API is briefly unreachable: ask again on the next poll
        return {}
    return dict(status)


def freeze_switch(lab: Lab, host: str, seconds: float = 30.0, timeout: float = 30.0) -> FaultReport:
    """Freeze ``host``'s ovs-vswitchd (SIGSTOP: alive, its TCP connection open, answering nothing).

    A frozen switch sends no TCP error, so only the controller's echo requests can find it
    dead (controller/connection.py: "no reply to an echo request"). Waits for that line in a
    controller's log, or ``seconds`` at most, then SIGCONT and waits until the switch has
    reconnected (if it was dropped) and the store says its switch is connected and current.
    ``down_s`` is the time to detection (``seconds`` when not detected), ``restart_s`` how long
    it stayed frozen, ``back_s`` the time from SIGCONT until the switch was programmed again.
    """
    state = _state(lab)
    _ovs_host(lab, state, host)
    if seconds <= 0:
        raise FaultError(f"--seconds: {seconds} is not a positive number of seconds")
    label = f"ovs-vswitchd:{host}"
    proc = _process(state, label)
    if not procs.alive(proc.ref):
        raise FaultError(f"{label}: pid {proc.pid} is not running")
    ctls = controllers(state)
    offsets = {p.log: _log_size(p.log) for p in ctls}
    dpid = _dpid(host)
    details: dict[str, float] = {}

    def logs() -> str:
        return "".join(_log_since(path, off) for path, off in offsets.items())

    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        deadline = t0 + seconds
        while time.monotonic() < deadline:
            if any(m[1] == dpid for m in ECHO_DROP_RE.finditer(logs())):
                details["dropped by echo"] = time.monotonic() - t0
                break
            time.sleep(POLL_S)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    frozen = time.monotonic() - t0
    detected = details.get("dropped by echo", frozen)
    t1 = time.monotonic()
    dropped = "dropped by echo" in details

    def reconnected(text: str) -> bool:
        """Every controller that dropped the switch has it again (with --ha the switch talks to both)."""
        drops = [m.end() for m in ECHO_DROP_RE.finditer(text) if m[1] == dpid]
        return not drops or any(m[1] == dpid for m in CONNECTED_RE.finditer(text, drops[-1]))

    def programmed() -> bool:
        if dropped and "reconnected" not in details:
            if not all(reconnected(_log_since(path, off)) for path, off in offsets.items()):
                return False
            details["reconnected"] = time.monotonic() - t1
        status = _switch_status(lab, state, host)
        if state.api_url and not (status.get("switch_connected") and status.get("switch_generation")):
            return False
        details["programmed"] = time.monotonic() - t1
        return True

    _wait(f"{label}: reconnecting to the controller after the freeze", programmed, timeout, proc.ref)
    back = time.monotonic() - t1
    mods = sum(int(m[2]) + int(m[3]) for m in FLOWS_RE.finditer(logs()) if m[1] == dpid)
    return FaultReport("freeze-switch", label, proc.pid, proc.pid, "STOP", detected, frozen, back, mods, details)


# -- the --ha lab (issue 13 items 5, 6): store members and the two controllers ----------------------
PROBE_HOST = "fault-probe"  # the host record kill-store-member writes (and removes) to see writes accepted
PROBE_DPID = 0xFA017  # far from the lab's hosts (datapath id = host number)
MASTER_RE = re.compile(r"became master")
ROLE_RE = re.compile(r"became master|became standby|standby: ")


def _api_write(lab: Lab, state: LabState) -> bool:
    """One API write (``host add`` of a compute host no switch will ever claim); True if the store took it.

    409 counts: the record exists, so an earlier attempt whose answer was lost was written.
    """
    try:
        reply = lab.api(state).http.post(
            "/v1/hosts", json={"name": PROBE_HOST, "datapath_id": PROBE_DPID, "role": "compute"}, timeout=5.0
        )
    except httpx.HTTPError:
        return False
    return reply.status_code in (200, 201, 409)


def _remove_probe_host(lab: Lab, state: LabState, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if lab.api(state).http.delete(f"/v1/hosts/{PROBE_HOST}", timeout=5.0).status_code in (200, 204, 404):
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise FaultError(f"could not remove the probe host {PROBE_HOST} within {timeout:.0f} s")
        time.sleep(POLL_S)


def _member_number(state: LabState, member: str) -> tuple[int, int | None]:
    """(the member to kill, the current leader) for N = 1..3 or ``leader``."""
    lead = ha.leader(state)
    if member == "leader":
        if lead is None:
            raise FaultError("N: no store member leads right now (an election is running); try again")
        return lead, lead
    if not member.isdigit() or not 1 <= int(member) <= services.STORE_MEMBERS:
        raise FaultError(f"N: {member!r} is not a store member (1..{services.STORE_MEMBERS} or 'leader')")
    return int(member), lead


def kill_store_member(lab: Lab, member: str, timeout: float = 60.0) -> FaultReport:
    """Kill -9 store member N (or the leader), time the API's write outage, restart it, wait until it rejoined.

    ``back_s`` is from the restart until the member is again a cluster member following a
    leader (its own ``cluster/status``); ``details`` has the write outage and, for a leader, the
    time until a survivor led.
    """
    state = _state(lab)
    if not state.ha:
        raise FaultError(
            f"N: lab {lab.name} has a standalone store (one ovsdb-server, no Raft cluster): there is no member {member} "
            "to kill without stopping the store itself (lab up --ha makes a 3-member cluster)"
        )
    if not state.api_url:
        raise FaultError(f"lab {lab.name} has no API to write through")
    n, lead = _member_number(state, member)
    label = services.member_label(n)
    old = _process(state, label)
    if not procs.alive(old.ref):
        raise FaultError(f"{label}: pid {old.pid} is not running")
    details: dict[str, float] = {}
    done = threading.Event()

    def watch_election() -> None:  # a write may block for seconds: the election is timed beside it
        while not done.is_set():
            if ha.leader(state) not in (None, n):
                details["new leader elected"] = time.monotonic() - t0
                return
            time.sleep(POLL_S)

    watcher = threading.Thread(target=watch_election, daemon=True)
    t0 = time.monotonic()
    down = _kill(old, signal.SIGKILL, timeout=10.0)
    if lead == n:
        watcher.start()
    try:
        deadline = t0 + timeout
        while "API write accepted again" not in details:
            if _api_write(lab, state):
                details["API write accepted again"] = time.monotonic() - t0
            elif time.monotonic() > deadline:
                raise FaultError(f"{label}: the API accepted no write within {timeout:.0f} s of the kill")
            else:
                time.sleep(POLL_S)
        if watcher.is_alive():
            watcher.join(timeout)
    finally:
        done.set()
        t1 = time.monotonic()
        new = lab.restart(label)
        restart = time.monotonic() - t1
    t2 = time.monotonic()
    state = _state(lab)
    try:
        ha.wait_member_rejoined(state, n, timeout)
    except ha.ClusterError as exc:
        raise FaultError(str(exc)) from None
    back = time.monotonic() - t2
    details[f"{label} rejoined"] = time.monotonic() - t0
    _remove_probe_host(lab, state, timeout)
    now = ha.leader(state)
    notes = [f"{label} was {'the leader' if lead == n else f'a follower (store-{lead} led)'}; "
             f"store-{now} leads now" if now else "no leader known now"]
    return FaultReport("kill-store-member", label, old.pid, new.pid, "KILL", down, restart, back, 0, details, notes)


def _choose_controller(state: LabState, which: str) -> tuple[Process, Process, str]:
    """(the controller to kill, the other one, the chosen one's role) for master, standby or 1/2."""
    ctls = {p.label: p for p in controllers(state)}
    labels = [services.controller_label(n) for n in range(1, services.HA_CONTROLLERS + 1)]
    if any(label not in ctls for label in labels):
        raise FaultError(f"lab {state.name} has no {' and '.join(labels)} (its controllers: {', '.join(ctls) or 'none'})")
    roles = {label: ha.controller_state(ctls[label]) for label in labels}
    if which in ("master", "standby"):
        chosen = [label for label in labels if roles[label] == which]
        if len(chosen) != 1:
            raise FaultError(f"--which: no single {which} controller right now (roles from their logs: {roles})")
        label = chosen[0]
    elif which.isdigit() and 1 <= int(which) <= services.HA_CONTROLLERS:
        label = services.controller_label(int(which))
    else:
        raise FaultError(f"--which: {which!r} is not master, standby or 1..{services.HA_CONTROLLERS}")
    (other,) = (ctls[o] for o in labels if o != label)
    return ctls[label], other, roles[label]


def kill_ha_controller(lab: Lab, state: LabState, which: str, sig: signal.Signals, timeout: float) -> FaultReport:
    """Kill one of the two controllers; if it was master, time until the other says ``became master``;
    restart it and wait until it names its role again (standby, or master if the other died meanwhile).

    ``details``: takeover (from the signal), and the restarted one's role line (from its restart).
    ``flow_mods``: flow-mods both logged from the signal until back (a takeover must send none).
    """
    deadline = time.monotonic() + timeout
    while True:  # right after a store election the lock may be between holders for a few seconds
        try:
            chosen, other, role = _choose_controller(state, which)
            break
        except FaultError:
            if time.monotonic() > deadline:
                raise
            time.sleep(POLL_S)
    offsets = {chosen.log: _log_size(chosen.log), other.log: _log_size(other.log)}
    details: dict[str, float] = {}
    t0 = time.monotonic()
    down = _kill(chosen, sig, timeout=10.0)
    try:
        if role == "master":
            _wait(f"{other.label}: taking over as master",
                  lambda: MASTER_RE.search(_log_since(other.log, offsets[other.log])) is not None, timeout, other.ref)
            details[f"{other.label} became master"] = time.monotonic() - t0
    finally:
        log_at = _log_size(chosen.log)
        t1 = time.monotonic()
        new = lab.restart(chosen.label)
        restart = time.monotonic() - t1
    t2 = time.monotonic()
    _wait(f"{chosen.label}: naming its role after the restart",
          lambda: ROLE_RE.search(_log_since(chosen.log, log_at)) is not None, timeout, new.ref)
    back = time.monotonic() - t2
    new_role = ha.controller_state(new)
    details[f"{chosen.label} back as {new_role or '?'}"] = time.monotonic() - t0
    mods = sum(flow_mods_in(_log_since(path, off)) for path, off in offsets.items())
    notes = [f"{chosen.label} was {role or 'of unknown role'}; {other.label} is {ha.controller_state(other) or '?'} now"]
    return FaultReport("kill-controller", chosen.label, chosen.pid, new.pid, sig.name.removeprefix("SIG"), down, restart,
                       back, mods, details, notes)
