"""Tier 3, issue 13 item 4: the agent repairs drift without a restart, and a restart recreates nothing.

Each drift case breaks one piece of the plumbing from outside (as an operator or a
stray script would), shows the breakage is real (the piece is gone and, where it
carries traffic, ``inet`` cannot reach the container), then waits -- bounded, polling
-- for the agent's full pass to put it back and for traffic to flow again. The
restart test kills the agent with SIGKILL and checks by ifindex, OpenFlow port
number, address/route/rule listings, nft chain handles and flow durations that the
new agent recreated nothing, while a TCP connection from ``inet`` stays up.

Both datapaths (the ``datapath`` fixture). An eBPF host has no br0, so the cases that break
br0's address, the pool route on br0 or an OVS port are OVS-only; their eBPF counterparts
remove the datapath's tc program from a container port and from the uplink ``up0`` (each
cuts traffic from ``inet``). After the restart, instead of OpenFlow port numbers and flow
durations, the eBPF host's pinned maps must keep their kernel ids and their entries (a map
re-created or an entry rewritten would show), and every port still runs the datapath's program.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from portmesh.lab import node
from portmesh.lab.network import Lab, ovs_of
from portmesh.model.config import DEFAULT_CONFIG as CFG
from tests.lab.conftest import lab_suffix
from tests.lab.test_isolation import PROBES
from tests.lab.test_mapping_e2e import Cloud, keep_logs, pytestmark
from tests.lab.tools import t4_ebpf

__all__ = ["pytestmark"]

IP = "203.0.113.20"
IP2 = "203.0.113.21"
GW = str(CFG.gateway_ip)
POOL = str(CFG.public_pools[0])
ECHO_PORT = 9000
ECHO = (
    "import socket,threading\n"
    "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',9000));s.listen(8)\n"
    "def h(c):\n"
    "    while (d:=c.recv(100)): c.sendall(d)\n"
    "while True:\n"
    "    c,_=s.accept();threading.Thread(target=h,args=(c,),daemon=True).start()\n"
)
CLIENT = (
    "import socket,sys\n"
    "c=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=5)\n"
    "print('READY',flush=True)\n"
    "for l in sys.stdin:\n"
    "    c.sendall(l.encode());print(c.recv(100).decode().strip(),flush=True)\n"
)


@pytest.fixture(scope="module")
def cloud(datapath: str) -> Iterator[Cloud]:
    lab = Lab(f"dr{os.getpid() % 10000}{lab_suffix(datapath)}", say=lambda _msg: None)
    try:
        state = lab.up(hosts=1, datapath=datapath)
        c = Cloud(state)
        c.run_container("dweb", IP, "80/tcp")
        c.cli("run", "decho", "--host", "h1", "--ip", IP, "--port", f"{ECHO_PORT}/tcp", "--", sys.executable, "-c", ECHO)
        c.wait_running("decho")
        yield c
    finally:
        keep_logs(lab)
        lab.down()


def sh(ns: str, *argv: str, check: bool = True) -> str:
    return node.run(list(argv), netns=ns, check=check, timeout=30).stdout


def reachable(cloud: Cloud, target: str = f"{IP}:80", timeout: float = 1.0) -> bool:
    out = node.run([sys.executable, PROBES, "tcp-probe", "--timeout", str(timeout), target], netns=cloud.netns("inet"),
                   check=True, timeout=30).stdout
    return bool(json.loads(out)["results"][0]["outcome"] == "connected")


def wait_until(cond: Callable[[], bool], timeout: float) -> float:
    """Poll ``cond`` until true; the seconds it took (fails after ``timeout``)."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"not repaired within {timeout}s"
        time.sleep(0.1)
    return time.monotonic() - t0


def ovs(cloud: Cloud, *argv: str) -> str:
    o = ovs_of(cloud.state, "h1")
    return node.run(list(argv), netns=o.netns, env=o.env(), check=True, timeout=30).stdout


def port_of(cloud: Cloud, name: str) -> str:
    return str(json.loads(cloud.cli("inspect", name, "-o", "json").stdout)["port_name"])


# Each case: (break it, is it there?, does breaking it cut traffic from inet?)
def _cases(cloud: Cloud) -> dict[str, tuple[list[str], str, Callable[[], bool], bool]]:
    cns, hns = cloud.netns("dweb"), cloud.state.ns("h1")
    port = port_of(cloud, "dweb")

    def has(ns: str, argv: list[str], text: str) -> Callable[[], bool]:
        return lambda: text in "\n" + sh(ns, *argv)  # "\nX" matches a line that starts with X

    return {
        "container-address": (["ip", "addr", "del", f"{IP}/32", "dev", "eth0"], cns,
                              has(cns, ["ip", "-o", "addr", "show", "dev", "eth0"], f"{IP}/32"), True),
        "container-default-route": (["ip", "route", "del", "default"], cns, has(cns, ["ip", "route"], "default via"), True),
        "container-gateway-route": (["ip", "route", "del", f"{GW}/32", "dev", "eth0"], cns,
                                    has(cns, ["ip", "route"], f"\n{GW} dev eth0"), False),
        "container-rule": (["ip", "rule", "del", "pref", "1"], cns, has(cns, ["ip", "rule"], "lookup 100"), False),
        # h1 has an uplink: eth0 takes its MTU, the route to the pools keeps the tunnels' (NetworkConfig.container_mtus).
        "container-mtu": (["ip", "link", "set", "eth0", "mtu", "1400"], cns,
                          has(cns, ["ip", "link", "show", "eth0"], "mtu 1500 "), False),
        "container-pool-route": (["ip", "route", "del", POOL], cns,
                                 has(cns, ["ip", "route"], f"\n{POOL} via {GW} dev eth0 proto static onlink mtu 1450"), False),
        "container-table100": (["ip", "route", "del", "local", IP, "dev", "eth0", "table", "100"], cns,
                               has(cns, ["ip", "route", "show", "table", "100"], f"local {IP}"), False),
        # Since h1's uplink up0 is a br0 port (agent --uplink), traffic from inet no longer crosses h1's
        # routing: neither br0's address nor the pool route carries it, so these two no longer cut it.
        "host-gateway-address": (["ip", "addr", "del", f"{GW}/32", "dev", "br0"], hns,
                                 has(hns, ["ip", "-o", "addr", "show", "dev", "br0"], f"{GW}/32"), False),
        "host-pool-route": (["ip", "route", "del", POOL, "dev", "br0"], hns, has(hns, ["ip", "route"], POOL), False),
        # Whole lines: "table netdev portmesh_uplink" (the uplink's table) must not count as "table netdev portmesh".
        "host-nft-netdev": (["nft", "delete", "table", "netdev", "portmesh"], hns,
                            has(hns, ["nft", "list", "tables"], "\ntable netdev portmesh\n"), False),
        "host-nft-inet": (["nft", "delete", "table", "inet", "portmesh"], hns,
                          has(hns, ["nft", "list", "tables"], "\ntable inet portmesh\n"), False),
        "veth": (["ip", "link", "del", port], hns, lambda: sh(hns, "ip", "link", "show", port, check=False).startswith(
            tuple("0123456789")), True),
        "bridge-port": (["ovs-vsctl", "del-port", "br0", port], "", lambda: port in ovs(cloud, "ovs-vsctl", "list-ports", "br0"),
                        True),
        # eBPF: the datapath's program taken off a port (its clsact qdisc deleted, the filter with it).
        "port-program": (["tc", "qdisc", "del", "dev", port, "clsact"], hns,
                         lambda: t4_ebpf.ingress_program(hns, port) == "pm_from_container", True),
        "uplink-program": (["tc", "qdisc", "del", "dev", "up0", "clsact"], hns,
                           lambda: t4_ebpf.ingress_program(hns, "up0") == "pm_from_uplink", True),
    }


CASES = ["container-address", "container-default-route", "container-gateway-route", "container-rule", "container-table100",
         "container-mtu", "container-pool-route",
         "host-gateway-address", "host-pool-route", "host-nft-netdev", "host-nft-inet", "bridge-port", "veth",
         "port-program", "uplink-program"]
OVS_ONLY = {"host-gateway-address": "br0's gateway address", "host-pool-route": "the pool route via br0",
            "bridge-port": "an OVS bridge port"}
EBPF_ONLY = {"port-program", "uplink-program"}


@pytest.mark.parametrize("case", CASES)
def test_agent_repairs_drift_without_a_restart(cloud: Cloud, datapath: str, case: str) -> None:
    if datapath == "ebpf" and case in OVS_ONLY:
        pytest.skip(f"OVS only: breaks {OVS_ONLY[case]}; an eBPF host has no br0 (ARP and routing are the program's)")
    if datapath == "ovs" and case in EBPF_ONLY:
        pytest.skip("an OVS host runs no tc datapath program")
    argv, ns, present, cuts = _cases(cloud)[case]
    assert wait_until(lambda: present() and reachable(cloud), 30) >= 0  # whole before we break it
    if ns:
        sh(ns, *argv)
    else:
        ovs(cloud, *argv)
    assert not present(), f"{case}: the break did not take"
    if cuts:
        assert not reachable(cloud, timeout=0.5), f"{case}: traffic still flows, the break is not real"
    took = wait_until(lambda: present() and reachable(cloud), 30)
    print(f"drift {case}: repaired and reachable after {took:.2f} s")


def _snapshot(cloud: Cloud) -> dict[str, object]:
    hns = cloud.state.ns("h1")
    out: dict[str, object] = {}
    for ns in (hns, cloud.netns("dweb"), cloud.netns("decho")):
        out[f"{ns} links"] = sorted(re.findall(r"^(\d+): (\S+?)[@:]", sh(ns, "ip", "-o", "link"), re.M))
        out[f"{ns} addrs"] = sorted(sh(ns, "ip", "-o", "-4", "addr").splitlines())
        # IPv4 only: the agent manages no IPv6, and br0's kernel link-local route appears on its own once DAD ends.
        out[f"{ns} routes"] = sorted(sh(ns, "ip", "-4", "route", "show", "table", "all").splitlines())
        out[f"{ns} rules"] = sh(ns, "ip", "rule")
    # With handles (a recreated chain gets a new one); without counters, which traffic moves (the uplink's table).
    out["nft"] = re.sub(r"counter packets \d+ bytes \d+", "counter", sh(hns, "nft", "-a", "list", "ruleset"))
    if cloud.state.datapath("h1") == "ebpf":  # the maps re-used, not re-created (a new map has a new id)
        out["map ids"] = t4_ebpf.map_ids(cloud.state, "h1")
    else:
        out["ofports"] = ovs(cloud, "ovs-vsctl", "--columns=name,ofport", "list", "Interface")
    return out


def _durations(cloud: Cloud) -> dict[str, float]:
    if cloud.state.datapath("h1") == "ebpf":
        # The maps' entries stand for the flows: none rewritten means each keeps the same content. The duration
        # is a constant so the caller's "none is younger" holds exactly when the entries are the same.
        return {f"{name}: {entry}": 0.0 for name, entries in t4_ebpf.map_contents(cloud.state, "h1").items()
                for entry in entries}
    flows = ovs(cloud, "ovs-ofctl", "-O", "OpenFlow13", "dump-flows", "br0")
    got = {}
    for line in flows.splitlines()[1:]:
        m = re.search(r"duration=([\d.]+)s", line)
        if m:
            key = re.sub(r"(duration=[\d.]+s|n_packets=\d+|n_bytes=\d+|idle_age=\d+|hard_age=\d+), ", "", line.strip())
            got[key] = float(m[1])
    return got


def test_kill_9_and_restart_recreates_nothing(cloud: Cloud) -> None:
    lab = Lab(cloud.state.name)
    client = subprocess.Popen(["ip", "netns", "exec", cloud.netns("inet"), sys.executable, "-c", CLIENT, IP, str(ECHO_PORT)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdin is not None and client.stdout is not None
        assert client.stdout.readline().strip() == "READY"
        client.stdin.write("one\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "one"
        before, flows = _snapshot(cloud), _durations(cloud)
        old = lab.state().process("agent:h1")  # type: ignore[union-attr]
        assert old is not None
        seen = os.path.getsize(old.log)
        os.kill(old.pid, signal.SIGKILL)  # the lab's agent, by its recorded PID
        new = lab.restart("agent:h1")
        assert new.pid != old.pid
        with open(old.log) as f:
            f.seek(seen)
            log = ""

            def logged(text: str) -> bool:
                nonlocal log
                log += f.read()
                return text in log

            # Its first pass (full) adopted everything; its second full pass checked it all for drift.
            wait_until(lambda: logged("realised generation"), 30)
            wait_until(lambda: logged("drift check:"), 30)
        assert "drifted" not in log, log
        now = _snapshot(cloud)
        changed = {k: (before[k], now[k]) for k in before if now[k] != before[k]}
        assert not changed, f"recreated or changed by the restart: {changed}"
        after = _durations(cloud)
        assert after.keys() == flows.keys()
        assert all(after[k] >= flows[k] for k in flows), "a flow was re-installed"
        if cloud.state.datapath("h1") == "ebpf":  # every port still runs the datapath (the new agent's object)
            hns = cloud.state.ns("h1")
            for name in ("dweb", "decho"):
                assert t4_ebpf.ingress_program(hns, port_of(cloud, name)) == "pm_from_container", name
            assert t4_ebpf.ingress_program(hns, "up0") == "pm_from_uplink"
        client.stdin.write("two\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "two", "the TCP connection from inet broke"
    finally:
        client.kill()  # our own child
        client.wait(10)


def test_container_started_while_the_agent_is_down_is_plumbed_when_it_returns(cloud: Cloud) -> None:
    lab = Lab(cloud.state.name)
    old = lab.state().process("agent:h1")  # type: ignore[union-attr]
    assert old is not None
    os.kill(old.pid, signal.SIGKILL)
    try:
        cloud.cli("run", "dlate", "--no-wait", "--host", "h1", "--ip", IP2, "--port", "80/tcp", "--",
                  sys.executable, "-m", "portmesh.lab.whoami", "--name", "dlate", "--tcp", "80")
        assert not reachable(cloud, f"{IP2}:80", timeout=0.5), "nothing plumbs it while the agent is down"
    finally:
        lab.restart("agent:h1")
    try:
        cloud.wait_running("dlate", timeout=30)
        took = wait_until(lambda: reachable(cloud, f"{IP2}:80"), 30)
        print(f"late container reachable {took:.2f} s after running")
    finally:
        cloud.cli("rm", "-f", "dlate", check=False)
