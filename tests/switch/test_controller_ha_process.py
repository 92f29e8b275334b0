"""Controller high availability with the real processes (issue 13 item 6).

Two ``python -m portmesh.controller`` processes against one real store (over TCP, as
a deployment has it) and two real switches (dummy datapaths in one ovs-vswitchd),
each switch with both controllers as targets. Exactly one is master (OVS says so in
its Controller rows), the standby writes nothing; ``kill -9`` of the master makes the
other master within 2 s with zero flow-mods and an identical flow table; the killed
one, restarted, stays standby; a frozen (SIGSTOP) master loses the lock when the
store drops its connection, and when it wakes up (SIGCONT) it goes standby without
touching a flow. Changes made through the store after each failover reach the
switches (the positive control for every "nothing changed").
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

import os_ken.base.app_manager  # noqa: F401  (os-ken import order)
import pytest
from os_ken.lib.packet import tcp

from portmesh.lab.dummy_ovs import DummyOVS
from portmesh.model.config import DEFAULT_CONFIG as CFG
from portmesh.model.entities import DesiredState, Host, Mapping, MappingKey, Proto
from portmesh.model.validation import new_container, new_mapping
from portmesh.store.client import Store
from portmesh.store.server import start_server, stop_server
from tests.switch.test_icmp_trace import ip_frame
from tests.switch.test_store import _free_port

pytestmark = pytest.mark.switch

IP = IPv4Address("203.0.113.20")
BRIDGES = {"h1": ("br0", 1), "h2": ("br1", 2)}


@dataclass
class Instance:
    """One controller process: its name, ports, log file and PID (stopped by that PID)."""

    name: str
    store: str
    workdir: Path
    port: int = field(default_factory=_free_port)
    metrics_port: int = field(default_factory=_free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self) -> Instance:
        argv = [sys.executable, "-m", "portmesh.controller", "--store", self.store, "--listen", self.target,
                "--metrics", f"127.0.0.1:{self.metrics_port}", "--name", self.name]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of a metric's samples (those whose labels contain ``labels``); 0 if absent."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
                body = r.read().decode()
        except OSError:
            return float("nan")
        total = 0.0
        for line in body.splitlines():
            if line.startswith(name) and (line[len(name)] in " {") and labels in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    def flow_mods(self) -> float:
        return self.metric("portmesh_controller_flow_mods_total")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a frozen one must run to die of SIGTERM
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, f"timed out after {timeout} s waiting for: {what}"
        time.sleep(0.01)
    return time.monotonic() - start


def roles(ovs: DummyOVS) -> dict[str, list[tuple[str, bool]]]:
    """Controller target -> [(role, is_connected)] over every bridge, as OVS reports them."""
    out = json.loads(ovs.vsctl("--format=json", "--columns=target,role,is_connected", "list", "controller"))
    got: dict[str, list[tuple[str, bool]]] = {}
    for target, role, connected in out["data"]:
        role = role if isinstance(role, str) else ""  # an empty set before any role request
        got.setdefault(target, []).append((role, connected))
    return got


def is_master(ovs: DummyOVS, c: Instance) -> bool:
    return roles(ovs).get(c.target) == [("master", True)] * len(BRIDGES)


def is_slave(ovs: DummyOVS, c: Instance) -> bool:
    return roles(ovs).get(c.target) == [("slave", True)] * len(BRIDGES)


def flows(ovs: DummyOVS) -> dict[str, list[str]]:
    """Every flow of every bridge with its cookie, no counters."""
    return {br: sorted(ovs.dump_flows(br)) for br, _ in BRIDGES.values()}


def build_state() -> DesiredState:
    state = DesiredState(hosts={h: Host(h, datapath_id=dp) for h, (_, dp) in BRIDGES.items()})
    for i, host in enumerate(BRIDGES):
        c = new_container(state, CFG, name=f"web{i}", host=host, ips=[IP])
        state = DesiredState(**{**state.__dict__, "containers": {**state.containers, c.name: c}})
        m = new_mapping(state, MappingKey(IP, Proto.TCP, 80 + i), c.name)
        state = DesiredState(**{**state.__dict__, "mappings": {**state.mappings, m.key: m}})
    return state


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Store, DummyOVS, DesiredState, str]]:
    if not all(os.path.exists(f"/usr/sbin/{b}") or os.path.exists(f"/usr/bin/{b}")
               for b in ("ovsdb-server", "ovs-vswitchd")):
        pytest.skip("openvswitch is not installed")
    tcp = f"127.0.0.1:{_free_port()}"
    pid = start_server(tmp_path / "store.db", tmp_path / "store.sock", tcp=tcp)
    ovs = DummyOVS(tmp_path / "ovs")
    (tmp_path / "ovs").mkdir()
    try:
        ovs.start()
        with Store(f"tcp:{tcp}", timeout=10) as store:
            state = build_state()
            for host in state.hosts.values():
                store.add_host(host)
            for c in state.containers.values():
                store.add_container(c, [m for m in state.mappings.values() if m.container == c.name])
            yield store, ovs, state, f"tcp:{tcp}"
    finally:
        ovs.stop()
        stop_server(pid)


def realised(store: Store, generation: int) -> bool:
    statuses = [store.host_status(h) for h in BRIDGES]
    return all(s.switch_connected and s.switch_generation >= generation and not s.switch_waiting for s in statuses)


def test_two_controllers_one_master_failover_without_churn(
    setup: tuple[Store, DummyOVS, DesiredState, str], tmp_path: Path
) -> None:
    store, ovs, state, remote = setup
    c1 = Instance("c1", remote, tmp_path).start()
    c2: Instance | None = None
    try:
        wait_for(lambda: "became master (epoch 1)" in c1.text(), 20, "c1 master")
        c2 = Instance("c2", remote, tmp_path).start()
        wait_for(lambda: "standby: c1 is master (epoch 1)" in c2.text(), 20, "c2 standby")
        for i, (bridge, dpid) in enumerate(BRIDGES.values()):
            ovs.add_bridge(bridge, dpid, c1.target)
            ovs.vsctl("set-controller", bridge, c1.target, c2.target)
            ovs.add_port(bridge, state.containers[f"web{i}"].port_name, 1)
        generation = store.snapshot().generation
        wait_for(lambda: realised(store, generation), 20, "both switches programmed by c1")
        wait_for(lambda: is_master(ovs, c1) and is_slave(ovs, c2), 20, "OVS: c1 master, c2 slave")
        assert c1.flow_mods() > 0  # positive control: the counter counts
        assert c2.flow_mods() == 0  # the standby wrote nothing
        assert c1.metric("portmesh_controller_is_master") == 1 and c2.metric("portmesh_controller_is_master") == 0
        before = flows(ovs)
        assert all(any("cookie=" in line for line in fl) for fl in before.values()), before
        # Packet-ins go to the master only (OVS's default async config for a slave has none): a SYN
        # to an unmapped port is punted for its refusal; the master sees it, the standby never.
        syn = ip_frame(CFG.gateway_mac, CFG.virtual_mac, "198.51.100.2", str(IP),
                       [tcp.tcp(src_port=40000, dst_port=9999, bits=tcp.TCP_SYN)], 6)
        ovs.appctl("netdev-dummy/receive", "br0", syn.hex())
        wait_for(lambda: c1.metric("portmesh_controller_packet_ins_total") >= 1, 10, "the master's packet-in")
        assert c2.metric("portmesh_controller_packet_ins_total") == 0

        # A host whose switch talks to no controller, last reported "connected" (by a master that died
        # before it could say otherwise): the next master must correct it.
        store.add_host(Host("h3", 3))
        store.report_switch("h3", 1, True)

        # kill -9 the master: c2 takes over (lock freed with c1's connection), MASTER(2) on every switch.
        assert c1.proc is not None
        os.kill(c1.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        c1.proc.wait()
        wait_for(lambda: "became master (epoch 2)" in c2.text(), 5, "c2 master")
        elected = time.monotonic() - killed
        # Every switch answered MASTER(2) and was synced (its cookies re-read, a full diff): c2's own counters.
        wait_for(lambda: c2.metric("portmesh_controller_syncs_total") >= len(BRIDGES), 5, "c2 synced every switch")
        programming = time.monotonic() - killed
        print(f"\nkill -9 master -> new master elected {elected:.2f} s, every switch MASTER(2) and synced "
              f"{programming:.2f} s; flow-mods {c2.flow_mods():.0f}")
        assert c2.text().count("role MASTER (epoch 2)") == len(BRIDGES)
        assert programming < 2.0
        assert c2.flow_mods() == 0
        assert flows(ovs) == before
        wait_for(lambda: not store.host_status("h3").switch_connected, 5, "h3 reported disconnected by c2")
        assert realised(store, generation)  # positive control: the connected ones stay connected
        # OVS's own view (its Controller rows are refreshed every few seconds, so not timed).
        wait_for(lambda: is_master(ovs, c2), 20, "OVS: c2 master")

        # The killed one comes back (same name): it stays standby, writes nothing.
        c1 = Instance("c1", remote, tmp_path, port=c1.port, metrics_port=c1.metrics_port).start()
        wait_for(lambda: "standby: c2 is master (epoch 2)" in c1.text(), 20, "restarted c1 standby")
        wait_for(lambda: is_slave(ovs, c1) and is_master(ovs, c2), 20, "OVS: c1 slave, c2 master")
        assert c1.flow_mods() == 0 and c2.flow_mods() == 0
        assert flows(ovs) == before

        # Positive control: a change through the store reaches the switches via the new master.
        extra = new_mapping(store.snapshot(), MappingKey(IP, Proto.UDP, 53), "web0")
        generation = store.add_mapping(extra)
        wait_for(lambda: realised(store, generation) and flows(ovs) != before, 10, "the new mapping on br0")
        assert c2.flow_mods() > 0 and c1.flow_mods() == 0
        before = flows(ovs)
        mods = c2.flow_mods()

        # Freeze the master: the store drops its connection by its inactivity probe, c1 gets the lock.
        assert c2.proc is not None
        os.kill(c2.proc.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        wait_for(lambda: "became master (epoch 3)" in c1.text(), 30, "c1 master while c2 is frozen")
        wait_for(lambda: is_master(ovs, c1), 20, "OVS: c1 master")
        print(f"SIGSTOP master -> other master after {time.monotonic() - frozen:.2f} s (store inactivity probe)")
        woke_at = len(c2.text())
        os.kill(c2.proc.pid, signal.SIGCONT)
        wait_for(lambda: "became standby" in c2.text()[woke_at:], 20, "woken c2 goes standby")
        wait_for(lambda: is_slave(ovs, c2) and is_master(ovs, c1), 30, "OVS: c2 slave again, c1 master")
        time.sleep(1.0)  # give a wrongly active c2 the time to churn something
        assert c1.flow_mods() == 0
        assert c2.flow_mods() == mods
        assert flows(ovs) == before
        woken = c2.text()[woke_at:]
        assert not re.search(r"flows added|compile\+send\+commit|became master", woken), woken

        # Positive control after the second failover: a removal reaches the switches through c1.
        generation = store.remove_mapping(extra.key)
        wait_for(lambda: realised(store, generation) and flows(ovs) != before, 10, "the mapping removed")
        assert c1.flow_mods() > 0 and c2.flow_mods() == mods
    finally:
        for c in (c1, c2):
            if c is not None:
                c.stop()


@pytest.mark.skipif(not os.environ.get("PORTMESH_HA_BENCH"), reason="opt-in measurement: PORTMESH_HA_BENCH=N mappings")
def test_measure_failover_at_scale(tmp_path: Path) -> None:
    """kill -9 of the master with N mappings (PORTMESH_HA_BENCH=N): time until the standby has every
    switch MASTER and fully synced (cookies re-read, every flow compiled and compared), flow-mods."""
    n = int(os.environ["PORTMESH_HA_BENCH"])
    tcp = f"127.0.0.1:{_free_port()}"
    pid = start_server(tmp_path / "store.db", tmp_path / "store.sock", tcp=tcp)
    ovs = DummyOVS(tmp_path / "ovs")
    (tmp_path / "ovs").mkdir()
    c1 = Instance("c1", f"tcp:{tcp}", tmp_path)
    c2 = Instance("c2", f"tcp:{tcp}", tmp_path)
    try:
        ovs.start()
        with Store(f"tcp:{tcp}", timeout=60) as store:
            state = build_state()
            for host in state.hosts.values():
                store.add_host(host)
            for i, c in enumerate(sorted(state.containers.values(), key=lambda c: c.name)):
                # TCP then UDP, ports from 1000: below the containers' port blocks up to 2 x 30,000 mappings
                half = (n + 1) // 2
                ms = [Mapping(MappingKey(IP, Proto.TCP if j < half else Proto.UDP, 1000 + j % half), c.name)
                      for j in range(i, n, 2)]
                store.add_container(c, ms)
            c1.start()
            wait_for(lambda: "became master (epoch 1)" in c1.text(), 60, "c1 master")
            c2.start()
            wait_for(lambda: "standby: c1 is master (epoch 1)" in c2.text(), 60, "c2 standby")
            for i, (bridge, dpid) in enumerate(BRIDGES.values()):
                ovs.add_bridge(bridge, dpid, c1.target)
                ovs.vsctl("set-controller", bridge, c1.target, c2.target)
                ovs.add_port(bridge, state.containers[f"web{i}"].port_name, 1)
            generation = store.snapshot().generation
            wait_for(lambda: realised(store, generation), 300, "both switches programmed")
            wait_for(lambda: is_slave(ovs, c2), 30, "OVS: c2 slave")
            before = flows(ovs)
            assert c1.proc is not None
            os.kill(c1.proc.pid, signal.SIGKILL)
            killed = time.monotonic()
            wait_for(lambda: c2.metric("portmesh_controller_syncs_total") >= len(BRIDGES), 120, "c2 synced")
            took = time.monotonic() - killed
            count = sum(len(f) for f in before.values())
            print(f"\n{n} mappings, {count} flows on {len(BRIDGES)} switches: kill -9 master -> standby master, every "
                  f"switch MASTER and synced {took:.2f} s, flow-mods {c2.flow_mods():.0f}")
            assert c2.flow_mods() == 0
            assert flows(ovs) == before
    finally:
        for instance in (c1, c2):
            instance.stop()
        ovs.stop()
        stop_server(pid)
