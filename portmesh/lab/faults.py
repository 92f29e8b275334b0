"""Fault injection in a running lab (issue 13 item 8): for users' own drills and for the fault tests.

Each fault kills exactly the process the lab recorded (PID *and* start time, never a name),
starts it again the way ``lab up`` did (:meth:`Lab.restart`), and waits until the component
is really back, so the lab stays whole and the report says how long recovery took:

- ``kill-controller``: back when every host's switch has reconnected (the controller's log
  says so per datapath); the flow-mods it sent since its restart are counted from its log
  (a restart that changes nothing must send none).
- ``restart-switch HOST``: ``ovs-vswitchd`` loses its flows; back when the controller has
  re-installed them (its log line for that datapath).
- ``kill-agent HOST``: back when the new agent has its store and OVSDB connections.

Times come from this process's monotonic clock, polling the logs every 20 ms.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
        out += [f"  {what}: {secs:.2f} s after the restart" for what, secs in self.details.items()]
        if self.fault in ("kill-controller", "restart-switch"):
            out.append(f"  flow-mods sent by the controller meanwhile: {self.flow_mods}")
        return out

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


def kill_controller(lab: Lab, sig: signal.Signals = signal.SIGKILL, timeout: float = 30.0) -> FaultReport:
    """Kill the controller with ``sig``, start it again, wait until every switch has reconnected."""
    state = _state(lab)
    old = _process(state, "controller")
    down = _kill(old, sig, timeout=10.0)
    ctl_log = old.log
    offset = _log_size(ctl_log)
    t0 = time.monotonic()
    new = lab.restart("controller")
    restart = time.monotonic() - t0
    t0 = time.monotonic()
    pending = {_dpid(h): h for h in state.hosts}
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
    if host not in state.hosts:
        raise FaultError(f"HOST: lab {lab.name} has no host {host!r} (hosts: {', '.join(state.hosts)})")
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


def kill_store_member(lab: Lab, member: int) -> FaultReport:
    """Reserved for a Raft store (issue 13 item 5); this lab's store is one standalone ovsdb-server."""
    _state(lab)
    raise FaultError(
        f"N: lab {lab.name} has a standalone store (one ovsdb-server, no Raft cluster): there is no member {member} to kill "
        "without stopping the store itself"
    )


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
    if host not in state.hosts:
        raise FaultError(f"HOST: lab {lab.name} has no host {host!r} (hosts: {', '.join(state.hosts)})")
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

    def programmed() -> bool:
        text = logs()
        if dropped and "reconnected" not in details:
            drop_at = max(m.end() for m in ECHO_DROP_RE.finditer(text) if m[1] == dpid)
            if not any(m[1] == dpid for m in CONNECTED_RE.finditer(text, drop_at)):
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
