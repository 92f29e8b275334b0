"""One Open vSwitch instance per lab host: its own ``ovsdb-server`` and ``ovs-vswitchd``.

Each instance lives in its host's namespace with every path of its own
(``OVS_RUNDIR``, db, pidfile, unixctl socket, log), so several run side by side
and ``ovs-ofctl``/``ovs-appctl`` reach the right one when given that
``OVS_RUNDIR``. Userspace TSO is switched on before ``ovs-vswitchd`` starts
(it is only read at start).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from portmesh.lab import node
from portmesh.runtime import procs

VSWITCH_SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")


@dataclass(frozen=True)
class OvsInstance:
    """Paths of one host's OVS; ``rundir`` is that host's own directory in the lab dir."""

    host: str
    netns: str
    rundir: Path

    @property
    def db(self) -> Path:
        return self.rundir / "conf.db"

    @property
    def db_sock(self) -> Path:
        return self.rundir / "db.sock"

    @property
    def remote(self) -> str:
        return f"unix:{self.db_sock}"

    def env(self) -> dict[str, str]:
        """Environment for anything talking to this OVS (``ovs-vsctl``, ``ovs-ofctl``, ``ovs-appctl``)."""
        env = dict(os.environ)
        for var in ("OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR", "OVS_SYSCONFDIR"):
            env[var] = str(self.rundir)
        return env

    def vsctl(self, *args: str) -> str:
        argv = ["ovs-vsctl", f"--db={self.remote}", "--timeout=10", *args]
        return node.run(argv, netns=self.netns, env=self.env()).stdout

    def start_db(self) -> procs.ProcRef:
        """Create the database and start ``ovsdb-server``; returns once its socket answers."""
        self.rundir.mkdir(parents=True, exist_ok=True)
        if not self.db.exists():
            node.run(["ovsdb-tool", "create", str(self.db), str(VSWITCH_SCHEMA)], env=self.env())
        argv = [
            "ovsdb-server",
            str(self.db),
            f"--remote=punix:{self.db_sock}",
            "--remote=db:Open_vSwitch,Open_vSwitch,manager_options",
            f"--pidfile={self.rundir / 'ovsdb-server.pid'}",
            f"--unixctl={self.rundir / 'ovsdb-server.ctl'}",
            f"--log-file={self.rundir / 'ovsdb-server.log'}",
        ]
        ref = procs.spawn(argv, self.rundir / "ovsdb-server.out", netns=self.netns, env=self.env())
        wait_unix_socket(self.db_sock, ref)
        self.vsctl("--no-wait", "init")
        self.vsctl("--no-wait", "set", "Open_vSwitch", ".", "other_config:userspace-tso-enable=true")
        return ref

    def start_vswitchd(self) -> procs.ProcRef:
        """Start ``ovs-vswitchd`` on the database (after :meth:`start_db`)."""
        argv = [
            "ovs-vswitchd",
            self.remote,
            f"--pidfile={self.rundir / 'ovs-vswitchd.pid'}",
            f"--unixctl={self.rundir / 'ovs-vswitchd.ctl'}",
            f"--log-file={self.rundir / 'ovs-vswitchd.log'}",
        ]
        ref = procs.spawn(argv, self.rundir / "ovs-vswitchd.out", netns=self.netns, env=self.env())
        wait_unix_socket(self.rundir / "ovs-vswitchd.ctl", ref)
        return ref


def wait_unix_socket(path: Path, ref: procs.ProcRef | None = None, timeout: float = 15.0) -> None:
    """Wait until a unix socket accepts connections (or the process that should make it dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ref is not None and not procs.alive(ref):
            raise RuntimeError(f"process {ref.pid} exited before {path} appeared")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(path))
                return
            except OSError:
                time.sleep(0.1)
    raise TimeoutError(f"{path} did not appear within {timeout:.0f} s")
