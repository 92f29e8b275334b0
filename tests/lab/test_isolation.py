"""Tier 3, issue 11: a container reaches the world only through the switch. Checked by what arrives where.

A hostile tenant sends frames of its own making from inside its container's
namespace (a raw AF_PACKET socket): spoofed source addresses and ports, to the
gateway MAC, to the host-side veth's MAC and as L2 broadcasts, also after a
spoofed ARP request. A recorder in ``inet`` must hear the legitimate datagrams
and none of the spoofed ones. Servers on every address of the host (uplink,
management, gateway, another link-local address) and on the management network
must answer the host itself and never a container. Every recorder and server
says READY before anything is sent; every negative has a positive control beside it.
Runs on both datapaths; on an eBPF host there is no br0 (the gateway address is the
program's, not the host's), so what reads br0 reads the eBPF host's links and tc programs.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from portmesh.lab import node
from portmesh.lab.network import UPLINK_IP, Lab, mgmt_ip
from portmesh.lab.services import CONTROLLER_IP
from portmesh.model.config import DEFAULT_CONFIG as CFG
from tests.lab.conftest import lab_suffix
from tests.lab.test_mapping_e2e import OUTSIDE_IP, Cloud, keep_logs, pytestmark
from tests.lab.tools import t1_ebpf

__all__ = ["pytestmark"]  # the lab/root/OVS marks of the end-to-end tests apply here too

PROBES = str(Path(__file__).parent / "tools" / "probes.py")
IP10, IP11 = "203.0.113.10", "203.0.113.11"
GW = str(CFG.gateway_ip)
RECORD_PORT = 7100
HOST_PORT, MGMT_PORT, OUTSIDE_TCP = 7200, 7201, 7202
OTHER_LINK_LOCAL = "169.254.77.7"  # another link-local address the host holds (on its lo)


@pytest.fixture(scope="module")
def cloud(datapath: str) -> Iterator[Cloud]:
    lab = Lab(f"iso{os.getpid() % 10000}{lab_suffix(datapath)}", say=lambda _msg: None)
    try:
        state = lab.up(hosts=1, datapath=datapath)
        c = Cloud(state, datapath)
        c.run_container("iweb1", IP10, "80/tcp")
        c.run_container("iweb2", IP10, "8080/udp")
        c.run_container("iweb3", IP11, "80/tcp")
        yield c
    finally:
        keep_logs(lab)
        lab.down()


class Started:
    """Helpers started in lab namespaces; each must say READY; all stopped by PID at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, netns: str, *args: str, timeout: float = 15) -> subprocess.Popen[str]:
        proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, PROBES, *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        assert line.strip() == "READY", f"{args[0]} in {netns} not ready: {line!r} {proc.poll()}"
        return proc

    def result(self, proc: subprocess.Popen[str], timeout: float = 30) -> dict[str, object]:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err
        answer: dict[str, object] = json.loads(out)
        return answer

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()  # our own child, by its PID
                proc.wait(10)


@pytest.fixture
def started() -> Iterator[Started]:
    helpers = Started()
    try:
        yield helpers
    finally:
        helpers.stop()


def _probe(cloud: Cloud, where: str, targets: tuple[str, ...]) -> dict[str, str]:
    """Try every IP:PORT from ``where`` at once; each one's outcome (connected, refused, timeout...)."""
    out = node.run([sys.executable, PROBES, "tcp-probe", "--timeout", "2", *targets], netns=cloud.netns(where),
                   check=True, timeout=30).stdout
    return {r["target"]: r["outcome"] for r in json.loads(out)["results"]}


def udp_frame(src_mac: str, dst_mac: str, src_ip: str, sport: int, payload: str) -> str:
    from os_ken.lib.packet import ethernet, ipv4, packet, udp

    pkt = packet.Packet()
    pkt.add_protocol(ethernet.ethernet(dst=dst_mac, src=src_mac, ethertype=0x0800))
    pkt.add_protocol(ipv4.ipv4(src=src_ip, dst=OUTSIDE_IP, proto=17))
    pkt.add_protocol(udp.udp(src_port=sport, dst_port=RECORD_PORT))
    pkt.add_protocol(payload.encode())
    pkt.serialize()
    return bytes(pkt.data).hex()


def arp_request(src_mac: str, sender_ip: str, target_ip: str) -> str:
    from os_ken.lib.packet import arp, ethernet, packet

    pkt = packet.Packet()
    pkt.add_protocol(ethernet.ethernet(dst="ff:ff:ff:ff:ff:ff", src=src_mac, ethertype=0x0806))
    pkt.add_protocol(arp.arp(opcode=1, src_mac=src_mac, src_ip=sender_ip, dst_mac="00:00:00:00:00:00", dst_ip=target_ip))
    pkt.serialize()
    return bytes(pkt.data).hex()


def veth_mac(cloud: Cloud, port_name: str) -> str:
    out = node.run(["ip", "-j", "link", "show", port_name], netns=cloud.state.ns("h1"), check=True).stdout
    return str(json.loads(out)[0]["address"])


def test_spoofed_datagrams_never_arrive_whichever_way_they_are_sent(cloud: Cloud, started: Started) -> None:
    web1 = cloud.wait_running("iweb1")
    mac, block_start = str(web1["mac"]), int(web1["block"]["start"])  # type: ignore[index]
    legit_port = block_start + 7
    ways = {"gw": CFG.gateway_mac, "veth": veth_mac(cloud, str(web1["port_name"])), "bcast": "ff:ff:ff:ff:ff:ff"}
    recorder = started.start(cloud.netns("inet"), "udp-record", "--port", str(RECORD_PORT), "--end", "END")

    frames = []
    for round_ in ("first", "after-arp"):
        if round_ == "after-arp":
            # The host kernel would answer this (with the veth's MAC) and learn IP11 -> web1's MAC.
            frames.append(arp_request(mac, IP11, GW))
        for way, dst in ways.items():
            frames.append(udp_frame(mac, dst, IP11, legit_port, f"spoof-ip-{way}-{round_}"))  # iweb3's IP
            frames.append(udp_frame(mac, dst, IP10, 8080, f"spoof-port-{way}-{round_}"))  # iweb2's service port
        frames.append(udp_frame(mac, CFG.gateway_mac, IP10, legit_port, f"legit-{round_}"))
    frames.append(udp_frame(mac, CFG.gateway_mac, IP10, legit_port, "END"))
    cloud.tool("iweb1", "raw-send", "--ifname", "eth0", *frames)

    heard = started.result(recorder)["heard"]
    assert isinstance(heard, list)
    assert [h["payload"] for h in heard] == ["legit-first", "legit-after-arp", "END"], heard
    assert {h["src"] for h in heard} == {f"{IP10}:{legit_port}"}


def test_gateway_neighbour_is_the_switch_even_after_arp_the_kernel_could_answer(cloud: Cloud, started: Started) -> None:
    web1 = cloud.wait_running("iweb1")
    mac = str(web1["mac"])
    ns = cloud.netns("iweb1")
    node.run(["ip", "neigh", "flush", "dev", "eth0"], netns=ns, check=True)
    sniffer = started.start(ns, "arp-record", "--ifname", "eth0", "--until-sha", CFG.gateway_mac, "--grace", "0.5")
    # A spoofed request first (the switch drops it; only the host kernel could answer), then a proper one.
    cloud.tool("iweb1", "raw-send", "--ifname", "eth0", arp_request(mac, IP11, GW), arp_request(mac, IP10, GW))
    replies = started.result(sniffer)["replies"]
    assert replies == [CFG.gateway_mac], f"ARP answers other than the switch's: {replies}"
    # The container's own resolution, through its kernel: ping makes it ARP; the switch answers both.
    ping = node.run(["ping", "-c1", "-W2", GW], netns=ns, check=False)
    assert ping.returncode == 0, ping.stdout
    neigh = json.loads(node.run(["ip", "-j", "neigh", "show", GW, "dev", "eth0"], netns=ns, check=True).stdout)
    assert [n.get("lladdr") for n in neigh] == [CFG.gateway_mac], neigh


def test_host_services_answer_the_host_and_never_a_container(cloud: Cloud, started: Started) -> None:
    h1, mgmt, inet = cloud.state.ns("h1"), cloud.state.ns("mgmt"), cloud.state.ns("inet")
    node.run(["ip", "addr", "add", f"{OTHER_LINK_LOCAL}/32", "dev", "lo"], netns=h1, check=True)
    try:
        started.start(h1, "tcp-serve", "--bind", "0.0.0.0", "--port", str(HOST_PORT))
        started.start(mgmt, "tcp-serve", "--bind", CONTROLLER_IP, "--port", str(MGMT_PORT))
        started.start(inet, "tcp-serve", "--bind", OUTSIDE_IP, "--port", str(OUTSIDE_TCP))
        host_targets = [f"{ip}:{HOST_PORT}" for ip in (UPLINK_IP, mgmt_ip(1), GW, OTHER_LINK_LOCAL)]
        # On an eBPF host the gateway address is not the host's (no br0): only the program answers for it
        # (ping, below), so the host's own positive control leaves it out; the container still tries it.
        own = [t for t in host_targets if cloud.datapath == "ovs" or not t.startswith(f"{GW}:")]
        mgmt_target = f"{CONTROLLER_IP}:{MGMT_PORT}"
        # Positive controls: the host reaches its own services and the management network; mgmt its own.
        assert set(_probe(cloud, "h1", (*own, mgmt_target)).values()) == {"connected"}
        assert _probe(cloud, "mgmt", (mgmt_target,)) == {mgmt_target: "connected"}
        # A container reaches the outside (positive control), and none of them.
        seen = _probe(cloud, "iweb1", (f"{OUTSIDE_IP}:{OUTSIDE_TCP}", *host_targets, mgmt_target))
        assert seen.pop(f"{OUTSIDE_IP}:{OUTSIDE_TCP}") == "connected"
        assert all(outcome != "connected" for outcome in seen.values()), seen
    finally:
        node.run(["ip", "addr", "del", f"{OTHER_LINK_LOCAL}/32", "dev", "lo"], netns=h1, check=False)


def test_switch_answers_ping_for_gateway_and_public_ips(cloud: Cloud) -> None:
    for target in (GW, IP11):
        ping = node.run(["ping", "-c1", "-W2", target], netns=cloud.netns("iweb1"), check=False)
        assert ping.returncode == 0, (target, ping.stdout)


def test_gateway_is_a_slash_32_and_claims_no_link_local_route(cloud: Cloud) -> None:
    h1 = cloud.state.ns("h1")
    if cloud.datapath == "ebpf":
        # No br0: the host holds no link-local address and no link-local route at all; the gateway is the
        # program's (answered on each container port), so nothing the host routes claims 169.254.0.0/16.
        addrs = json.loads(node.run(["ip", "-j", "-4", "addr", "show"], netns=h1, check=True).stdout)
        held = [a["local"] for link in addrs for a in link["addr_info"]]
        assert UPLINK_IP in held and not any(ip.startswith("169.254.") for ip in held), held
        routes = json.loads(node.run(["ip", "-j", "-4", "route", "show", "table", "all"], netns=h1, check=True).stdout)
        assert not [r for r in routes if r["dst"].startswith("169.254.")], routes
        meta = node.run(["ip", "-4", "route", "get", "169.254.169.254"], netns=h1, check=False)
        assert not any(f" dev {p} " in meta.stdout for p in _ports(cloud)), meta.stdout
        return
    addrs = json.loads(node.run(["ip", "-j", "-4", "addr", "show", "br0"], netns=h1, check=True).stdout)
    held = [(a["local"], a["prefixlen"]) for a in addrs[0]["addr_info"]]
    assert held == [(GW, 32)], held
    routes = json.loads(node.run(["ip", "-j", "-4", "route", "show", "table", "all"], netns=h1, check=True).stdout)
    link_local = [r for r in routes if r.get("dev") == "br0" and r["dst"].startswith("169.254.")]
    assert all(r["dst"] == GW for r in link_local), link_local  # only the /32's own local route
    meta = node.run(["ip", "-4", "route", "get", "169.254.169.254"], netns=h1, check=False)
    assert "br0" not in meta.stdout, meta.stdout


def _ports(cloud: Cloud) -> set[str]:
    return {str(cloud.wait_running(n)["port_name"]) for n in ("iweb1", "iweb2", "iweb3")}


def test_each_container_port_is_isolated_from_the_host_stack(cloud: Cloud) -> None:
    """The mechanism behind the delivery tests above: one netdev ingress drop chain per container port."""
    ports = _ports(cloud)
    if cloud.datapath == "ebpf":  # and the container port program in front of it, on every port
        assert {t1_ebpf.ingress_program(cloud.state.ns("h1"), p) for p in ports} == {"pm_from_container"}
    listing = json.loads(node.run(["nft", "-j", "list", "table", "netdev", "portmesh"], netns=cloud.state.ns("h1"),
                                  check=True).stdout)["nftables"]
    chains = {o["chain"]["name"]: o["chain"] for o in listing if "chain" in o}
    assert ports <= set(chains), (ports, chains)
    assert all(chains[p]["hook"] == "ingress" and chains[p]["policy"] == "drop" for p in ports)


def test_removed_container_leaves_no_chain(cloud: Cloud) -> None:
    cloud.run_container("itmp", "203.0.113.12", "80/tcp")
    port = str(cloud.wait_running("itmp")["port_name"])
    h1 = cloud.state.ns("h1")

    def chains() -> set[str]:
        out = node.run(["nft", "-j", "list", "table", "netdev", "portmesh"], netns=h1, check=True).stdout
        return {o["chain"]["name"] for o in json.loads(out)["nftables"] if "chain" in o}

    assert port in chains()
    if cloud.datapath == "ebpf":
        assert t1_ebpf.ingress_program(h1, port) == "pm_from_container"
    cloud.cli("rm", "itmp")
    deadline = time.monotonic() + 20
    while port in chains():
        assert time.monotonic() < deadline, "the removed container's chain is still there"
        time.sleep(0.2)
    if cloud.datapath == "ebpf":  # the port (and the program on it) went with the container
        assert not t1_ebpf.link_exists(h1, port)
