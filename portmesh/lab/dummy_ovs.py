"""A real ovsdb-server + ovs-vswitchd on the dummy datapath, for tier-2 tests and control-plane benchmarks.

No kernel interface is created (dummy ports live inside ovs-vswitchd), so this
needs no namespace; every file lives in one temporary directory and both
processes are stopped by the PIDs this object started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

VSWITCH_SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"


class DummyOVS:
    """One switch instance with its own OVS_RUNDIR, db, unixctl sockets and logs."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.env = dict(os.environ, OVS_RUNDIR=str(workdir), OVS_LOGDIR=str(workdir), OVS_DBDIR=str(workdir))
        self.db_sock = workdir / "db.sock"
        self.vswitchd_ctl = workdir / "vswitchd.ctl"
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> DummyOVS:
        db = self.dir / "conf.db"
        subprocess.run(["ovsdb-tool", "create", str(db), VSWITCH_SCHEMA], check=True, env=self.env)
        self.procs.append(subprocess.Popen(
            ["ovsdb-server", str(db), f"--remote=punix:{self.db_sock}", f"--unixctl={self.dir / 'db.ctl'}",
             f"--log-file={self.dir / 'ovsdb-server.log'}"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self._wait_for(self.db_sock)
        self.vsctl("--no-wait", "init")
        self.procs.append(subprocess.Popen(
            ["ovs-vswitchd", f"unix:{self.db_sock}", "--enable-dummy=override", f"--unixctl={self.vswitchd_ctl}",
             f"--log-file={self.dir / 'ovs-vswitchd.log'}"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self._wait_for(self.vswitchd_ctl)
        return self

    def add_bridge(self, name: str, datapath_id: int, controller: str) -> None:
        """A secure-mode OpenFlow 1.3 bridge on the dummy datapath, controller set first."""
        self.vsctl(
            "add-br", name, "--", "set", "bridge", name, "datapath_type=dummy", "fail_mode=secure",
            "protocols=OpenFlow13", f"other_config:datapath-id={datapath_id:016x}",
            "other_config:hwaddr=0a:00:00:00:00:01",
        )
        self.vsctl("set-controller", name, controller)

    def add_port(self, bridge: str, name: str, ofport: int) -> None:
        self.vsctl("add-port", bridge, name, "--", "set", "interface", name, "type=dummy",
                   f"ofport_request={ofport}")

    def vsctl(self, *args: str) -> str:
        return self._run("ovs-vsctl", f"--db=unix:{self.db_sock}", "--timeout=10", *args)

    def ofctl(self, *args: str) -> str:
        return self._run("ovs-ofctl", "-O", "OpenFlow13", *args)

    def appctl(self, *args: str) -> str:
        return self._run("ovs-appctl", "-t", str(self.vswitchd_ctl), *args)

    def trace(self, bridge: str, flow: str) -> str:
        return self.appctl("ofproto/trace", bridge, flow)

    def dump_flows(self, bridge: str) -> list[str]:
        out = self.ofctl("dump-flows", "--no-stats", bridge)
        return [line.strip() for line in out.splitlines() if "actions=" in line or "priority" in line]

    def _run(self, *cmd: str) -> str:
        done = subprocess.run(cmd, capture_output=True, text=True, env=self.env)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    @staticmethod
    def _wait_for(path: Path, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} did not appear")
            time.sleep(0.02)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
