"""The light runtime: a container is a network namespace running one command.

It shares the host's filesystem, users and everything but the network, which is
all the lab and the scale tests need (thousands of endpoints, no images). What
it started is recorded as JSON under ``state_dir`` (namespace name, PID and start
time), so a restarted agent adopts running containers instead of restarting
them, and stops only the processes it recorded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import netns as pr_netns

from portmesh.model.entities import Container, ContainerStatus, RunState
from portmesh.runtime import procs
from portmesh.runtime.base import netns_name

IDLE_COMMAND = ("sleep", "infinity")


@dataclass
class _Record:
    name: str
    netns: str
    proc: procs.ProcRef | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "netns": self.netns, "proc": self.proc.to_json() if self.proc else None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Record:
        proc = data.get("proc")
        return cls(str(data["name"]), str(data["netns"]), procs.ProcRef.from_json(proc) if proc else None)


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
        ns = record.netns
        if record.proc is None or not procs.alive(record.proc):
            argv = container.command or IDLE_COMMAND
            try:
                record.proc = procs.spawn(argv, self.log_path(container.name), netns=ns, cwd=Path("/"))
            except OSError as exc:
                record.proc = None
                self._save(record)
                return ContainerStatus(RunState.ERROR, ns, None, f"cannot start {argv[0]!r}: {exc}")
            self._save(record)
        return self._status(record)

    def stop(self, name: str) -> None:
        record = self._load(name)
        if record is None:
            return
        if record.proc is not None:
            procs.stop(record.proc)
            record.proc = None
            self._save(record)

    def status(self, name: str) -> ContainerStatus | None:
        record = self._load(name)
        return None if record is None else self._status(record)

    def _status(self, record: _Record) -> ContainerStatus:
        if record.proc is not None:
            procs.reap(record.proc.pid)
        log = str(self.log_path(record.name))  # reported so the API (same machine) can serve `portmesh logs`
        if not netns_exists(record.netns):
            return ContainerStatus(RunState.ERROR, "", None, f"network namespace {record.netns} is missing", log)
        if record.proc is None:
            return ContainerStatus(RunState.EXITED, record.netns, None, "stopped", log)
        if procs.alive(record.proc):
            return ContainerStatus(RunState.RUNNING, record.netns, record.proc.pid, "", log)
        return ContainerStatus(RunState.EXITED, record.netns, None, f"process {record.proc.pid} exited", log)

    def remove(self, name: str) -> None:
        record = self._load(name)
        if record is None:
            return
        if record.proc is not None:
            procs.stop(record.proc)
        if netns_exists(record.netns):
            pr_netns.remove(record.netns)
        self._path(name).unlink(missing_ok=True)
