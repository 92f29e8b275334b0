"""The light runtime: a container is a network namespace running one command.

It shares the host's filesystem (but not portmesh's secrets and state, and it
starts in a working directory of its own: :mod:`portmesh.runtime.isolation`),
users and everything but the network and the mount table, which is all the lab
and the scale tests need (thousands of endpoints, no images). What it started is
recorded as JSON under ``state_dir`` (namespace name, PID and start time, last
exit code, restart count), so a restarted agent adopts running containers
instead of restarting them, and stops only the processes it recorded.

Restart policy (Docker's): a process that exited stays exited under ``no``; under
``on-failure`` it is started again if its exit code was not 0 (or is unknown: it
was started by an agent before a restart, so nobody collected its code); under
``always`` it is started again. The agent asks on each of its full passes (every
few seconds), which is the back-off. A stop followed by a start, or a start of an
exited container (``Container.starts`` changed), is a fresh start whatever the
policy (the restart count is reset, as ``docker start`` does).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import netns as pr_netns

from portmesh.model.entities import DEFAULT_STOP_TIMEOUT, Container, ContainerStatus, RestartPolicy, RunState
from portmesh.runtime import procs
from portmesh.runtime.base import netns_name
from portmesh.runtime.isolation import Isolation, environment

RUNTIME_KIND = "light"

IDLE_COMMAND = ("sleep", "infinity")


@dataclass
class _Record:
    name: str
    netns: str
    proc: procs.ProcRef | None = None
    exit_code: int | None = None  # of the last process that exited (None: none did, or unknown)
    restarts: int = 0  # starts by the restart policy since the last start asked for
    exited: bool = False  # ``proc`` exited and that was noticed (its exit code collected)
    starts: int = 0  # the container's ``starts`` last honoured (a change is a start asked for)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "netns": self.netns,
            "proc": self.proc.to_json() if self.proc else None,
            "exit_code": self.exit_code,
            "restarts": self.restarts,
            "exited": self.exited,
            "starts": self.starts,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Record:
        proc = data.get("proc")
        code = data.get("exit_code")
        return cls(
            str(data["name"]),
            str(data["netns"]),
            procs.ProcRef.from_json(proc) if proc else None,
            int(code) if code is not None else None,
            int(data.get("restarts", 0)),
            bool(data.get("exited", False)),
            int(data.get("starts", 0)),
        )


def should_restart(policy: RestartPolicy, exit_code: int | None) -> bool:
    """Docker's rule: ``always``; ``on-failure`` unless it exited 0; never under ``no``."""
    return policy == RestartPolicy.ALWAYS or (policy == RestartPolicy.ON_FAILURE and exit_code != 0)


def netns_exists(name: str) -> bool:
    """True if ``/run/netns/<name>`` names a network namespace (one stat, not a directory listing:
    the agent asks for each of its containers on every pass)."""
    return os.path.exists(os.path.join(pr_netns.NETNS_RUN_DIR, name))


class LightRuntime:
    """Containers as namespaces + processes; see the module docstring."""

    keeps_netns_when_stopped = True

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._records = state_dir / "containers"
        self._logs = state_dir / "logs"
        self._records.mkdir(parents=True, exist_ok=True)

    # -- records ---------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self._records / f"{name}.json"

    def _load(self, name: str) -> _Record | None:
        try:
            return _Record.from_json(json.loads(self._path(name).read_text()))
        except FileNotFoundError:
            return None

    def _save(self, record: _Record) -> None:
        tmp = self._path(record.name).with_suffix(".tmp")
        tmp.write_text(json.dumps(record.to_json()))
        os.replace(tmp, self._path(record.name))

    def known(self) -> list[str]:
        return sorted(p.stem for p in self._records.glob("*.json"))

    def log_path(self, name: str) -> Path:
        """Where the container's stdout and stderr go."""
        return self._logs / f"{name}.log"

    # -- Runtime protocol --------------------------------------------------------

    def prepare(self, container: Container, netns_prefix: str) -> str:
        return self._prepared(container, netns_prefix).netns

    def _prepared(self, container: Container, netns_prefix: str) -> _Record:
        """The container's record, made (and saved) if new; its namespace, made if missing."""
        record = self._load(container.name)
        if record is None:
            record = _Record(container.name, netns_name(netns_prefix, container.name))
            self._save(record)  # recorded before it exists, so a crash in between still gets cleaned up
        if not netns_exists(record.netns):
            pr_netns.create(record.netns)
        return record

    def start(self, container: Container, netns_prefix: str) -> ContainerStatus:
        record = self._prepared(container, netns_prefix)
        if record.proc is not None and not procs.alive(record.proc):
            if self._noticed_exit(record):
                self._save(record)
            if container.starts != record.starts:  # `portmesh start` of the exited container
                record.starts = container.starts
                record.restarts = 0
                return self._spawn(container, record)
            if not should_restart(container.restart, record.exit_code):
                return self._status(record)
            record.restarts += 1
            return self._spawn(container, record)
        if record.proc is None:
            record.restarts = 0  # asked for (first start, or start after stop): not a policy restart
            record.starts = container.starts
            return self._spawn(container, record)
        return self._status(record)

    def _noticed_exit(self, record: _Record) -> bool:
        """Collect the exit code of the record's process once; True if the record changed."""
        if record.proc is None or record.exited:
            return False
        record.exit_code = procs.exit_code(record.proc.pid)
        record.exited = True
        return True

    def isolation(self, name: str) -> Isolation:
        """The mount isolation of container ``name``'s process (portmesh's state hidden, own working dir)."""
        return Isolation.for_container(self.state_dir, name)

    def _spawn(self, container: Container, record: _Record) -> ContainerStatus:
        argv = container.command or IDLE_COMMAND
        iso = self.isolation(container.name)
        try:
            iso.prepare()
            record.proc = procs.spawn(
                argv,
                self.log_path(container.name),
                netns=record.netns,
                env=environment(container.name, container.env),
                setup=iso.enter,
            )
            record.exited = False
        except (OSError, subprocess.SubprocessError) as exc:
            record.proc = None
            self._save(record)
            status = ContainerStatus(RunState.ERROR, record.netns, None, f"cannot start {argv[0]!r}: {exc}")
            return self._with_counts(status, record)
        self._save(record)
        return self._status(record)

    def stop(self, name: str, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds (``docker stop --time``)."""
        record = self._load(name)
        if record is None:
            return
        if record.proc is not None:
            if procs.alive(record.proc):
                procs.stop(record.proc, timeout=float(timeout))
            self._noticed_exit(record)
            record.proc = None
            record.exited = False
            self._save(record)

    def status(self, name: str) -> ContainerStatus | None:
        record = self._load(name)
        return None if record is None else self._status(record)

    @staticmethod
    def _with_counts(status: ContainerStatus, record: _Record) -> ContainerStatus:
        return ContainerStatus(
            status.state,
            status.netns,
            status.pid,
            status.message,
            status.log_path,
            exit_code=record.exit_code,
            restarts=record.restarts,
            runtime=RUNTIME_KIND,
        )

    def _status(self, record: _Record) -> ContainerStatus:
        if record.proc is not None:
            procs.reap(record.proc.pid)
        log = str(self.log_path(record.name))  # reported so the API (same machine) can serve `portmesh logs`
        if not netns_exists(record.netns):
            status = ContainerStatus(RunState.ERROR, "", None, f"network namespace {record.netns} is missing", log)
        elif record.proc is None:
            status = ContainerStatus(RunState.EXITED, record.netns, None, "stopped", log)
        elif procs.alive(record.proc):
            status = ContainerStatus(RunState.RUNNING, record.netns, record.proc.pid, "", log)
        else:
            if self._noticed_exit(record):
                self._save(record)
            code = "unknown code" if record.exit_code is None else f"code {record.exit_code}"
            status = ContainerStatus(RunState.EXITED, record.netns, None, f"exited ({code})", log)
        return self._with_counts(status, record)

    def remove(self, name: str) -> None:
        record = self._load(name)
        if record is None:
            return
        if record.proc is not None:
            procs.stop(record.proc)
        if netns_exists(record.netns):
            pr_netns.remove(record.netns)
        shutil.rmtree(self.isolation(name).workdir, ignore_errors=True)
        self._path(name).unlink(missing_ok=True)
