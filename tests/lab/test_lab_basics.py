"""Tier 3 basics: a lab comes up sealed in its namespaces, per-host OVS is separate, and down leaves nothing.

Needs root, openvswitch-switch and busybox; each lab gets a unique name and is
torn down in a ``finally`` even when the test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from portmesh.lab import link, node, services, sysctl
from portmesh.lab.network import Lab, bpf_dir, ovs_of
from portmesh.lab.state import LabState, lab_dir
from portmesh.runtime import procs
from tests.lab.conftest import lab_suffix
from tests.lab.tools import t2_ebpf, t4_ebpf

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(shutil.which("ovs-vswitchd") is None, reason="openvswitch-switch is not installed"),
]

LAB_RANGES = ("198.18.", "198.19.", "198.51.100.", "203.0.113.")


def unique_name(tag: str) -> str:
    return f"t{tag}{os.getpid() % 100000}"


def quiet(msg: str) -> None:
    print(msg)


@pytest.fixture
def lab_factory() -> Iterator[list[Lab]]:
    """Labs made by a test; every one is taken down afterwards, whatever happened."""
    made: list[Lab] = []
    try:
        yield made
    finally:
        for lab in made:
            lab.down()


@pytest.fixture(scope="module")
def lab2(datapath: str) -> Iterator[LabState]:
    """One lab with two hosts, shared by the read-only tests of this module."""
    lab = Lab(unique_name("m") + lab_suffix(datapath), say=quiet)
    try:
        yield lab.up(hosts=2, datapath=datapath)
    finally:
        lab.down()


def run_in(ns: str, *argv: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    return node.run(argv, netns=ns, env=env, check=check).stdout


def root_addresses() -> str:
    return (
        subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
        + subprocess.run(["ip", "-o", "route", "show", "table", "all"], capture_output=True, text=True, check=True).stdout
    )


RMEM = "net.core.rmem_default"


def mounts_under(path: Path) -> list[str]:
    return [line for line in Path("/proc/mounts").read_text().splitlines() if str(path) in line]


def test_up_then_down_leaves_nothing(lab_factory: list[Lab], datapath: str) -> None:
    root_before = root_addresses()
    lab = Lab(unique_name("u") + lab_suffix(datapath), say=quiet)
    lab_factory.append(lab)
    lab.up(hosts=3, datapath=datapath)
    assert lab.add_host() == "h4"  # a host joined later is removed by down like the others
    state = lab.state()
    assert state is not None and state.hosts == ["h1", "h2", "h3", "h4"]
    assert {"ul0", "u-h1", "u-h4", "m-h4"} <= link.links(state.ns("mgmt"))

    assert state.namespaces and all(node.exists(ns) for ns in state.namespaces)
    assert all(ns.startswith(state.prefix) for ns in state.namespaces)
    assert state.processes and all(procs.alive(p.ref) for p in state.processes)
    assert sysctl.read(RMEM) == str(4 * 1024 * 1024)
    held = sysctl.registered(RMEM)  # other engineers' labs may hold it too: the last one down puts it back
    assert held is not None and state.name in held[1], held
    # Nothing of the lab in the machine's own namespace (the API's loopback socket aside).
    for line in set(root_addresses().splitlines()) - set(root_before.splitlines()):
        assert not any(r in line for r in LAB_RANGES), line

    if datapath == "ebpf":  # each host's bpffs, mounted by the lab (h4's too): gone with the lab
        on_ebpf = [h for h in state.hosts if state.datapath(h) == "ebpf"]  # h4 runs OVS: Lab.add_host has no datapath
        assert on_ebpf and all(mounts_under(bpf_dir(state, h)) for h in on_ebpf), mounts_under(state.dir)
    assert lab.down() == []
    assert not mounts_under(state.dir), "a bpffs (or any mount) of the lab outlived it"
    assert not [ns for ns in node.names() if ns.startswith(state.prefix)]
    assert not [p.label for p in state.processes if procs.alive(p.ref)]
    assert not lab_dir(state.name).exists()
    still = sysctl.registered(RMEM)
    if still is None:
        assert sysctl.read(RMEM) == held[0], "the last lab down puts the machine's value back"
    else:
        assert state.name not in still[1] and sysctl.read(RMEM) == str(4 * 1024 * 1024), still


def test_overlapping_labs_share_the_machine_setting(lab_factory: list[Lab]) -> None:
    """a up, b up, a down: b keeps its 4 MiB socket buffers (a must not put the old value back under b)."""
    a, b = Lab(unique_name("ra"), say=quiet), Lab(unique_name("rb"), say=quiet)
    lab_factory.extend([a, b])
    a.up(hosts=1)
    b.up(hosts=1)
    held = sysctl.registered(RMEM)
    assert held is not None and {a.name, b.name} <= set(held[1]), held
    assert a.down() == []
    assert sysctl.read(RMEM) == str(4 * 1024 * 1024), "a's down put the value back while b is up"
    assert b.down() == []
    still = sysctl.registered(RMEM)
    assert sysctl.read(RMEM) == (held[0] if still is None else str(4 * 1024 * 1024)), still


def test_two_labs_never_share_names(lab_factory: list[Lab]) -> None:
    a = Lab(unique_name("a"), say=quiet)
    b = Lab(unique_name("b"), say=quiet)
    lab_factory.extend([a, b])
    sa, sb = a.up(hosts=1, tune_rmem=False), b.up(hosts=1, tune_rmem=False)
    assert not set(sa.namespaces) & set(sb.namespaces)
    assert a.down() == []
    assert all(node.exists(ns) for ns in sb.namespaces), "taking lab a down touched lab b"


def test_down_without_up_is_harmless() -> None:
    assert Lab(unique_name("n"), say=quiet).down() == []


def test_each_host_runs_its_own_ovs(lab2: LabState, datapath: str) -> None:
    if datapath == "ebpf":
        # An eBPF host runs no OVS: its own datapath is the program and maps in its own bpffs.
        ids: set[int] = set()
        for host in lab2.hosts:
            assert lab2.process(f"ovs-vswitchd:{host}") is None
            assert mounts_under(bpf_dir(lab2, host)) and "bpf" in mounts_under(bpf_dir(lab2, host))[0].split()[2]
            t2_ebpf.wait_pinned(lab2, host)
            found = set(t4_ebpf.map_ids(lab2, host).values())
            assert not found & ids, f"{host} shares a map with another host"
            ids |= found
        return
    pids = set()
    for host in lab2.hosts:
        ovs = ovs_of(lab2, host)
        env = ovs.env()
        vswitchd = lab2.process(f"ovs-vswitchd:{host}")
        assert vswitchd is not None and procs.alive(vswitchd.ref)
        assert int((ovs.rundir / "ovs-vswitchd.pid").read_text()) == vswitchd.pid
        pids.add(vswitchd.pid)
        ctl = str(ovs.rundir / "ovs-vswitchd.ctl")
        assert "Open vSwitch" in run_in(ovs.netns, "ovs-appctl", "-t", ctl, "version", env=env)
        tso = run_in(
            ovs.netns, "ovs-vsctl", f"--db={ovs.remote}", "get", "Open_vSwitch", ".", "other_config:userspace-tso-enable", env=env
        )
        assert tso.strip().strip('"') == "true"
    assert len(pids) == len(lab2.hosts)


def test_agent_makes_br0_reachable_through_its_own_rundir(lab2: LabState, datapath: str) -> None:
    if lab2.process("agent:h1") is None:
        pytest.skip("no agent in this lab (portmesh.store or portmesh.agent missing)")
    if datapath == "ebpf":
        # No br0: the agent's own datapath is ready once its uplink program is on up0 (after the first map sync).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and t4_ebpf.ingress_program(lab2.ns("h1"), "up0") != "pm_from_uplink":
            time.sleep(0.5)
        assert t4_ebpf.ingress_program(lab2.ns("h1"), "up0") == "pm_from_uplink"
        return
    ovs = ovs_of(lab2, "h1")
    deadline = time.monotonic() + 20
    out = ""
    while time.monotonic() < deadline:
        out = run_in(ovs.netns, "ovs-ofctl", "-O", "OpenFlow13", "show", "br0", env=ovs.env(), check=False)
        if "dpid:0000000000000001" in out:
            break
        time.sleep(0.5)
    assert "dpid:0000000000000001" in out
    fail_mode = run_in(ovs.netns, "ovs-vsctl", f"--db={ovs.remote}", "get-fail-mode", "br0", env=ovs.env())
    assert fail_mode.strip() == "secure"


def test_inet_reaches_h1_uplink_and_hosts_reach_mgmt(lab2: LabState) -> None:
    run_in(lab2.ns("inet"), "ping", "-c1", "-W2", "198.51.100.1")
    for host in lab2.hosts:
        run_in(lab2.ns(host), "ping", "-c1", "-W2", services.CONTROLLER_IP)


def test_container_sees_the_real_client_address(lab2: LabState) -> None:
    """End to end through the API: whoami in a container answers inet with no NAT either way."""
    if not lab2.api_url or lab2.process("agent:h1") is None:
        pytest.skip("no API or agent in this lab")
    token = services.token_file(lab2.dir).read_text().strip()
    http = httpx.Client(base_url=lab2.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=15)
    whoami = [sys.executable, "-m", "portmesh.lab.whoami", "--name", "web", "--tcp", "80"]
    reply = http.post(
        "/v1/containers", json={"name": "web", "host": "h1", "ips": ["203.0.113.10"], "ports": [{"port": 80}], "command": whoami}
    )
    assert reply.status_code == 201, reply.text
    try:
        deadline = time.monotonic() + 20
        answer = ""
        while time.monotonic() < deadline and "name=web" not in answer:
            answer = run_in(lab2.ns("inet"), "busybox", "nc", "-w", "2", "203.0.113.10", "80", check=False)
            time.sleep(0.3)
        assert "name=web client=198.51.100.2:" in answer
        assert "local=203.0.113.10:80" in answer
        status = http.get("/v1/containers/web").json()["status"]
        assert status["state"] == "running" and status["netns"] == lab2.ns("c-web")
    finally:
        http.delete("/v1/containers/web")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and node.exists(lab2.ns("c-web")):
        time.sleep(0.3)
    assert not node.exists(lab2.ns("c-web")), "the agent did not tear the container's namespace down"


def test_status_reports_what_is_recorded(lab2: LabState) -> None:
    status = Lab(lab2.name, say=quiet).status()
    assert status["up"] is True
    assert json.loads(json.dumps(status))["namespaces"] == {ns: True for ns in lab2.namespaces}


def test_agent_restart_disturbs_nothing(lab2: LabState, datapath: str) -> None:
    """A restarted agent adopts plumbing and process: no netlink change, same PID, same flows."""
    if not lab2.api_url or lab2.process("agent:h1") is None:
        pytest.skip("no API or agent in this lab")
    token = services.token_file(lab2.dir).read_text().strip()
    http = httpx.Client(base_url=lab2.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=15)
    whoami = [sys.executable, "-m", "portmesh.lab.whoami", "--name", "db", "--tcp", "5432"]
    body = {"name": "db", "host": "h1", "ips": ["203.0.113.20"], "ports": [{"port": 5432}], "command": whoami}
    assert http.post("/v1/containers", json=body).status_code == 201
    ovs = ovs_of(lab2, "h1")
    try:
        deadline = time.monotonic() + 20
        status: dict[str, object] = {}
        while time.monotonic() < deadline and status.get("state") != "running":
            status = http.get("/v1/containers/db").json().get("status") or {}
            time.sleep(0.3)
        assert status.get("state") == "running"
        time.sleep(1)  # let the controller finish installing

        def flows() -> list[str]:
            if datapath == "ebpf":  # the maps (same kernel ids, same entries) and the programs on the devices
                h1 = lab2.ns("h1")
                # The program id is left out: a restarted agent loads the object again into the same
                # filter slot, by design (the pinned maps, same ids and entries, carry the state).
                programs = [f"{d}: {[f[:3] for f in t2_ebpf.ingress_filters(h1, d)]}" for d in sorted(t2_ebpf.program_ports(h1))]
                return [*t4_ebpf.entries(lab2, "h1"), json.dumps(t4_ebpf.map_ids(lab2, "h1"), sort_keys=True), *programs]
            out = run_in(ovs.netns, "ovs-ofctl", "-O", "OpenFlow13", "--no-stats", "dump-flows", "br0", env=ovs.env())
            return sorted(out.splitlines()[1:])

        before = flows()
        monitors = [
            subprocess.Popen(["ip", "-n", ns, "monitor", "link", "address", "route", "rule"], stdout=subprocess.PIPE, text=True)
            for ns in (lab2.ns("h1"), lab2.ns("c-db"))
        ]
        time.sleep(0.3)
        old = lab2.process("agent:h1")
        assert old is not None
        seen = Path(old.log).stat().st_size  # the new agent appends to the same log

        def new_log() -> str:
            return Path(old.log).read_text()[seen:]

        agent = Lab(lab2.name, say=quiet).restart("agent:h1")
        assert agent.pid != old.pid
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "realised generation" not in new_log():
            time.sleep(0.3)
        time.sleep(0.5)
        events = []
        for mon in monitors:
            mon.terminate()
            events.append(mon.communicate(timeout=5)[0])
        assert "realised generation" in new_log(), new_log()
        assert events == ["", ""], events
        after = http.get("/v1/containers/db").json()["status"]
        assert after["pid"] == status["pid"]
        assert flows() == before
    finally:
        http.delete("/v1/containers/db")


def test_underlay_of_its_own_and_components_over_tcp(lab2: LabState) -> None:
    """Hosts meet on ul0 (198.19.0.0/24, full 1500-byte frames); agents reach the store over TCP in mgmt."""
    h1, h2 = lab2.ns("h1"), lab2.ns("h2")
    assert "198.19.0.11/24" in run_in(h1, "ip", "-o", "-4", "addr", "show", "dev", "ul0")
    assert "mtu 1500" in run_in(h1, "ip", "link", "show", "dev", "ul0")
    # 1472 bytes of ICMP payload + 28 of headers = 1500, unfragmented: passes; one byte more does not leave h1.
    run_in(h1, "ping", "-c1", "-W2", "-M", "do", "-s", "1472", "198.19.0.12")
    too_big = node.run(["ping", "-c1", "-W2", "-M", "do", "-s", "1473", "198.19.0.12"], netns=h1, check=False)
    assert too_big.returncode != 0
    assert "up0" not in run_in(h2, "ip", "-o", "link"), "compute hosts have no uplink"
    store = lab2.process("store")
    assert store is not None and store.netns == lab2.ns("mgmt")
    listening = run_in(lab2.ns("mgmt"), "ss", "-Hltn")
    assert f"{services.CONTROLLER_IP}:{services.STORE_PORT}" in listening, listening
    for host in lab2.hosts:
        agent = lab2.process(f"agent:{host}")
        if agent is not None:
            assert agent.argv[agent.argv.index("--store") + 1] == services.store_tcp_remote()
            assert not any(arg.startswith("unix:") and "store" in arg for arg in agent.argv), agent.argv
