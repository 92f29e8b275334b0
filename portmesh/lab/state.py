"""What a lab made, recorded as JSON under ``/run/portmesh/<lab>/`` as it is made.

``lab down`` removes exactly what is recorded here and nothing else, so each
step is saved *before* the thing exists: a lab that failed half-way up is
still torn down completely.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from portmesh.runtime.procs import ProcRef

RUN_ROOT = Path("/run/portmesh")
LAB_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,15}$")


def lab_dir(name: str) -> Path:
    """Where lab ``name`` keeps its state, sockets and logs."""
    return RUN_ROOT / name


def lab_prefix(name: str) -> str:
    """Namespace prefix: two labs with different names never share a namespace name."""
    return f"pm-{name}-"


@dataclass
class Process:
    """A daemon the lab started: where, what, and which PID (with start time)."""

    label: str
    pid: int
    start_time: int
    argv: list[str]
    netns: str | None = None
    log: str = ""

    @property
    def ref(self) -> ProcRef:
        return ProcRef(self.pid, self.start_time)


@dataclass
class LabState:
    """Everything ``lab down`` needs; saved after each step of ``lab up``."""

    name: str
    hosts: list[str] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)  # (netns, ifname) of each veth end we made
    processes: list[Process] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)  # machine-wide key -> value before the lab
    agent_state_dirs: list[str] = field(default_factory=list)
    api_url: str = ""
    docker_url: str = ""  # the engine image containers go to (a Docker daemon, or the lab's Podman service)
    ha: bool = False  # lab up --ha: store-1..3 (a Raft cluster) and controller-1, controller-2
    agent_store: str = ""  # the store remote(s) and controller target(s) the agents were given ("" = the defaults)
    agent_controller: str = ""
    # Hosts that run the eBPF datapath instead of OVS (lab up --datapath): host -> "ebpf"; absent = OVS.
    datapaths: dict[str, str] = field(default_factory=dict)
    mounts: list[str] = field(default_factory=list)  # bpffs mount points made for eBPF hosts (unmounted on down)

    @property
    def dir(self) -> Path:
        return lab_dir(self.name)

    @property
    def prefix(self) -> str:
        return lab_prefix(self.name)

    @property
    def path(self) -> Path:
        return self.dir / "lab.json"

    def ns(self, node: str) -> str:
        """Namespace name of a lab node (``mgmt``, ``inet``, ``h1``...)."""
        return self.prefix + node

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**asdict(self), "prefix": self.prefix, "dir": str(self.dir)}, indent=2))
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, name: str) -> LabState | None:
        try:
            data: dict[str, Any] = json.loads((lab_dir(name) / "lab.json").read_text())
        except FileNotFoundError:
            return None
        data.pop("prefix", None)  # derived from the name; saved for readers of the JSON (bench, demo)
        data.pop("dir", None)
        data["processes"] = [Process(**p) for p in data.get("processes", [])]
        data["links"] = [tuple(link) for link in data.get("links", [])]
        return cls(**data)

    def datapath(self, host: str) -> str:
        """``ovs`` or ``ebpf``: what forwards on ``host``."""
        return self.datapaths.get(host, "ovs")

    def process(self, label: str) -> Process | None:
        return next((p for p in self.processes if p.label == label), None)
