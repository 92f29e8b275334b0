"""Tier 3, the single-host core end to end: a real lab, real clients in `inet`, on both datapaths.

One lab for the module per datapath (brought up once, always taken down). Containers are
made through the CLI, which talks to the API, which writes the store; the agent plumbs
them and the controller programs the switch (OVS) or the agent fills the program's maps
(eBPF). Every assertion is on traffic that really crossed the datapath, or on the
datapath's own state: OVS flows and their counters, or the eBPF maps and drop counters.
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

import pytest

from portmesh.agent.ebpf.layout import DropReason
from portmesh.lab import node, services
from portmesh.lab.network import Lab, ovs_of
from portmesh.lab.state import LabState
from portmesh.model.config import DEFAULT_CONFIG as CFG
from tests.lab.conftest import lab_suffix
from tests.lab.tools import t1_ebpf

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(shutil.which("ovs-vswitchd") is None, reason="openvswitch-switch is not installed"),
]

TOOLS = str(Path(__file__).parent / "tools" / "clients.py")
PROBES = str(Path(__file__).parent / "tools" / "probes.py")
IP10, IP11 = "203.0.113.10", "203.0.113.11"
OUTSIDE_IP = "198.51.100.2"
OUTSIDE_PORT = 7000


class Cloud:
    """The lab plus the CLI pointed at its API."""

    def __init__(self, state: LabState, datapath: str = "ovs") -> None:
        self.state = state
        self.datapath = datapath
        self.env = dict(
            os.environ,
            PORTMESH_API=state.api_url or "",
            PORTMESH_TOKEN_FILE=str(services.token_file(state.dir)),
        )

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "portmesh.cli.app", *args], env=self.env,
                              capture_output=True, text=True, timeout=60)
        if check and done.returncode:
            raise AssertionError(f"portmesh {' '.join(args)} failed ({done.returncode}): {done.stderr}")
        return done

    def run_container(self, name: str, ip: str, *ports: str) -> None:
        whoami = [sys.executable, "-m", "portmesh.lab.whoami", "--name", name]
        for spec in ports:
            port, _, proto = spec.partition("/")
            whoami += [f"--{proto or 'tcp'}", port]
        argv = ["run", name, "--host", "h1", "--ip", ip]
        for spec in ports:
            argv += ["--port", spec]
        self.cli(*argv, "--", *whoami)
        self.wait_running(name)

    def wait_running(self, name: str, timeout: float = 20) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        info: dict[str, object] = {}
        while time.monotonic() < deadline:
            info = json.loads(self.cli("inspect", name, "-o", "json").stdout)
            status = info.get("status") or {}
            if isinstance(status, dict) and status.get("state") == "running":
                return info
            time.sleep(0.2)
        raise AssertionError(f"{name} never ran: {info}")

    def tool(self, where: str, *args: str, timeout: float = 60) -> dict[str, object]:
        """Run the traffic tool inside a lab namespace and return its JSON answer."""
        ns = self.netns(where)
        out = node.run([sys.executable, TOOLS, *args], netns=ns, check=True, timeout=timeout).stdout
        result: dict[str, object] = json.loads(out)
        return result

    def netns(self, where: str) -> str:
        return Lab(self.state.name).netns_of(where)

    def flows(self) -> list[str]:
        """OVS: h1's flows as dump-flows prints them. eBPF: see :meth:`mapped` and :meth:`macs`."""
        assert self.datapath == "ovs", "an eBPF host has no flows; read its maps"
        ovs = ovs_of(self.state, "h1")
        out = node.run(["ovs-ofctl", "-O", "OpenFlow13", "dump-flows", "br0"], netns=ovs.netns,
                       env=ovs.env(), check=True).stdout
        return [line.strip() for line in out.splitlines()[1:]]

    def wait_for(self, probe: object, timeout: float = 10) -> None:
        assert callable(probe)
        deadline = time.monotonic() + timeout
        while not probe():
            assert time.monotonic() < deadline, f"condition not met within {timeout}s"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cloud(datapath: str) -> Iterator[Cloud]:
    lab = Lab(f"e{os.getpid() % 100000}{lab_suffix(datapath)}", say=lambda _msg: None)
    outside: subprocess.Popen[bytes] | None = None
    try:
        state = lab.up(hosts=1, datapath=datapath)
        c = Cloud(state, datapath)
        c.run_container("web1", IP10, "80/tcp")
        c.run_container("web2", IP10, "8080/tcp")
        c.run_container("web3", IP11, "80/tcp", "53/udp")
        outside = subprocess.Popen(
            ["ip", "netns", "exec", state.ns("inet"), sys.executable, "-m", "portmesh.lab.whoami",
             "--name", "outside", "--tcp", str(OUTSIDE_PORT), "--udp", str(OUTSIDE_PORT)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        yield c
    finally:
        if outside is not None:
            outside.terminate()
            outside.wait(10)
        keep_logs(lab)
        lab.down()


def keep_logs(lab: Lab) -> None:
    """Copy the lab's component logs out before `down` removes them: a failed run stays explainable."""
    state = lab.state()
    if state is not None and (state.dir / "logs").exists():
        dest = Path("/tmp/portmesh-test-logs") / state.name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(state.dir / "logs", dest)


def whoami_from_inet(cloud: Cloud, ip: str, port: int, proto: str = "tcp") -> dict[str, str]:
    result = cloud.tool("inet", proto, "--host", ip, "--port", str(port), "--count", "1")
    assert result["ok"] == 1, result
    replies = result["replies"]
    assert isinstance(replies, list)
    reply: dict[str, str] = replies[0]
    return reply


def test_inbound_by_port_reaches_the_right_container_without_nat(cloud: Cloud) -> None:
    for ip, port, name in ((IP10, 80, "web1"), (IP10, 8080, "web2"), (IP11, 80, "web3")):
        reply = whoami_from_inet(cloud, ip, port)
        assert reply["name"] == name
        assert reply["client"].startswith(f"{OUTSIDE_IP}:"), "the server must see the real client address"
        assert reply["local"] == f"{ip}:{port}", "the server must see its own public IP as destination"
        assert reply["client"].split(":")[1] == reply["my_port"], "source port untouched"


def test_udp_mapping(cloud: Cloud) -> None:
    reply = whoami_from_inet(cloud, IP11, 53, "udp")
    assert reply["name"] == "web3"
    assert reply["client"] == f"{OUTSIDE_IP}:{reply['my_port']}"


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_sharers_as_clients_200_each(cloud: Cloud, proto: str) -> None:
    """web1 and web2 share 203.0.113.10; both open 200 concurrent flows to one outside server:port."""
    args = ["--host", OUTSIDE_IP, "--port", str(OUTSIDE_PORT), "--count", "200"]
    if proto == "tcp":
        args += ["--hold", "1.5"]
    procs = {
        name: subprocess.Popen(["ip", "netns", "exec", cloud.netns(name), sys.executable, TOOLS, proto, *args],
                               stdout=subprocess.PIPE, text=True)
        for name in ("web1", "web2")
    }
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=60)
        result = json.loads(out)
        assert result["ok"] == 200, result["errors"]
        info = cloud.wait_running(name)
        block = info["block"]
        assert isinstance(block, dict)
        for reply in result["replies"]:
            # The outside server saw the shared public IP and the container's own source port...
            ip, port = reply["client"].split(":")
            assert ip == IP10 and port == reply["my_port"]
            # ...which lies in the container's own block, so the reply came back to it.
            assert block["start"] <= int(port) <= block["end"], (name, port, block)


def test_same_ip_traffic_to_neighbour_and_self(cloud: Cloud) -> None:
    to_neighbour = cloud.tool("web1", "tcp", "--host", IP10, "--port", "8080")
    assert to_neighbour["ok"] == 1, to_neighbour
    assert to_neighbour["replies"][0]["name"] == "web2"  # type: ignore[index]
    to_self = cloud.tool("web1", "tcp", "--host", IP10, "--port", "80")
    assert to_self["ok"] == 1, to_self
    assert to_self["replies"][0]["name"] == "web1"  # type: ignore[index]
    loopback = node.run(["ping", "-c1", "-W1", "127.0.0.1"], netns=cloud.netns("web1"), check=False)
    assert loopback.returncode == 0, "loopback inside the container still works"


def test_arp_answered_by_switch_never_by_containers(cloud: Cloud) -> None:
    if cloud.datapath == "ebpf":
        arp_answered_by_the_program_never_by_containers(cloud)
        return
    h1 = cloud.netns("h1")
    sniffers = {
        name: subprocess.Popen(["ip", "netns", "exec", cloud.netns(name), sys.executable, TOOLS, "sniff",
                                "--ethertype", "0x0806", "--seconds", "3"], stdout=subprocess.PIPE, text=True)
        for name in ("web1", "web2")
    }
    time.sleep(0.5)
    node.run(["ip", "neigh", "flush", "dev", "br0"], netns=h1, check=False)
    # h1's own traffic to a public IP makes it ARP on br0 (inbound traffic from inet no longer crosses
    # h1's routing: its uplink is a switch port, --uplink, so it would not).
    node.run(["ping", "-c1", "-W1", IP10], netns=h1, check=False)
    neigh = node.run(["ip", "neigh", "show", IP10, "dev", "br0"], netns=h1, check=True).stdout
    assert CFG.virtual_mac in neigh, neigh
    for name, proc in sniffers.items():
        out, _ = proc.communicate(timeout=20)
        assert json.loads(out)["frames"] == 0, f"ARP reached {name}"
    ping = node.run(["ping", "-c2", "-W1", IP10], netns=cloud.netns("inet"), check=False)
    assert ping.returncode == 0, ping.stdout


def arp_request(src_mac: str, sender_ip: str, target_ip: str) -> str:
    from os_ken.lib.packet import arp, ethernet, packet

    pkt = packet.Packet()
    pkt.add_protocol(ethernet.ethernet(dst="ff:ff:ff:ff:ff:ff", src=src_mac, ethertype=0x0806))
    pkt.add_protocol(arp.arp(opcode=1, src_mac=src_mac, src_ip=sender_ip, dst_mac="00:00:00:00:00:00", dst_ip=target_ip))
    pkt.serialize()
    return bytes(pkt.data).hex()


def arp_answered_by_the_program_never_by_containers(cloud: Cloud) -> None:
    """eBPF: no br0 on h1 (the OVS case ARPs from there); a container's ARP request for a public address
    (its sharer's, a neighbour's) is answered by the container port program with the virtual MAC, and no
    ARP frame reaches another container."""
    web1 = cloud.wait_running("web1")
    sniffers = {
        name: subprocess.Popen(["ip", "netns", "exec", cloud.netns(name), sys.executable, TOOLS, "sniff",
                                "--ethertype", "0x0806", "--seconds", "3"], stdout=subprocess.PIPE, text=True)
        for name in ("web2", "web3")
    }
    recorder = subprocess.Popen(["ip", "netns", "exec", cloud.netns("web1"), sys.executable, PROBES, "arp-record",
                                 "--ifname", "eth0", "--until-sha", CFG.virtual_mac, "--grace", "0.5"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert recorder.stdout is not None and recorder.stdout.readline().strip() == "READY"
        time.sleep(0.5)  # the sniffers (no READY line of their own) are bound by now
        cloud.tool("web1", "raw-send", "--ifname", "eth0", arp_request(str(web1["mac"]), IP10, IP11))
        out, _ = recorder.communicate(timeout=20)
        assert json.loads(out)["replies"] == [CFG.virtual_mac], out
        for name, proc in sniffers.items():
            out, _ = proc.communicate(timeout=20)
            assert json.loads(out)["frames"] == 0, f"ARP reached {name}"
    finally:
        for proc in (recorder, *sniffers.values()):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
    ping = node.run(["ping", "-c2", "-W1", IP10], netns=cloud.netns("inet"), check=False)
    assert ping.returncode == 0, ping.stdout


def test_unmapped_is_refused_promptly(cloud: Cloud) -> None:
    tcp = cloud.tool("inet", "tcp-refused", "--host", IP10, "--port", "9999")
    assert tcp["outcome"] == "refused" and float(tcp["seconds"]) < 1.0, tcp  # type: ignore[arg-type]
    udp = cloud.tool("inet", "udp-refused", "--host", IP10, "--port", "9999")
    assert udp["outcome"] == "refused" and float(udp["seconds"]) < 1.0, udp  # type: ignore[arg-type]


def spoofed_frames(src_mac: str, src_ip: str, src_port: int, dst_mac: str) -> str:
    from os_ken.lib.packet import ethernet, ipv4, packet, tcp

    pkt = packet.Packet()
    pkt.add_protocol(ethernet.ethernet(dst=dst_mac, src=src_mac, ethertype=0x0800))
    pkt.add_protocol(ipv4.ipv4(src=src_ip, dst=OUTSIDE_IP, proto=6))
    pkt.add_protocol(tcp.tcp(src_port=src_port, dst_port=OUTSIDE_PORT, bits=tcp.TCP_SYN))
    pkt.serialize()
    return bytes(pkt.data).hex()


def drop_count(cloud: Cloud, port_name: str) -> int:
    if cloud.datapath == "ebpf":  # the program's per-reason counters, for every port security reason
        drops = t1_ebpf.spoof_drops(cloud.state, "h1")
        return sum(drops[r] for r in (DropReason.SPOOF_MAC, DropReason.SPOOF_IP, DropReason.SPOOF_PORT))
    ovs = ovs_of(cloud.state, "h1")
    ofport = node.run(["ovs-vsctl", f"--db={ovs.remote}", "get", "interface", port_name, "ofport"],
                      netns=ovs.netns, env=ovs.env(), check=True).stdout.strip()
    for line in cloud.flows():
        if "priority=10" in line and f"in_port={ofport}" in line and "actions=drop" in line:
            return int(line.split("n_packets=")[1].split(",")[0])
    raise AssertionError(f"no port-security drop flow for port {ofport}")


def test_port_security_drops_and_counts_spoofing(cloud: Cloud) -> None:
    web1 = cloud.wait_running("web1")
    web2 = cloud.wait_running("web2")
    gw = CFG.gateway_mac
    w2_block = web2["block"]
    assert isinstance(w2_block, dict)
    frames = [
        spoofed_frames(str(web2["mac"]), IP10, 33000, gw),                   # web2's MAC
        spoofed_frames(str(web1["mac"]), IP11, int(w2_block["start"]), gw),  # an IP web1 does not hold
        spoofed_frames(str(web1["mac"]), IP10, int(w2_block["start"]) + 5, gw),  # a port in web2's block
        spoofed_frames(str(web1["mac"]), IP10, 8080, gw),                    # web2's service port
    ]
    before = drop_count(cloud, str(web1["port_name"]))
    reasons = t1_ebpf.spoof_drops(cloud.state, "h1") if cloud.datapath == "ebpf" else {}
    cloud.tool("web1", "raw-send", "--ifname", "eth0", *frames)
    cloud.wait_for(lambda: drop_count(cloud, str(web1["port_name"])) >= before + len(frames))
    if cloud.datapath == "ebpf":  # and each frame for its own reason
        after = t1_ebpf.spoof_drops(cloud.state, "h1")
        grew = {r: after[r] - reasons[r] for r in (DropReason.SPOOF_MAC, DropReason.SPOOF_IP, DropReason.SPOOF_PORT)}
        assert grew == {DropReason.SPOOF_MAC: 1, DropReason.SPOOF_IP: 1, DropReason.SPOOF_PORT: 2}, grew
    # And it cannot take over web2's mapping through the API.
    taken = cloud.cli("map", "add", IP10, "8080/tcp", "web1", check=False)
    assert taken.returncode == 1 and "8080" in taken.stderr, taken.stderr
    assert whoami_from_inet(cloud, IP10, 8080)["name"] == "web2"


def test_removing_mapping_and_container_leaves_nothing(cloud: Cloud) -> None:
    cloud.run_container("tmp1", "203.0.113.12", "80/tcp", "8081/tcp")
    info = cloud.wait_running("tmp1")
    assert whoami_from_inet(cloud, "203.0.113.12", 8081)["name"] == "tmp1"
    if cloud.datapath == "ebpf":  # positive control for the map reads below
        assert {("203.0.113.12", 80, 6), ("203.0.113.12", 8081, 6)} <= t1_ebpf.mapping_keys(cloud.state, "h1")
        assert str(info["mac"]) in t1_ebpf.macs(cloud.state, "h1")
    cloud.cli("map", "rm", "203.0.113.12", "8081/tcp")
    refused = cloud.tool("inet", "tcp-refused", "--host", "203.0.113.12", "--port", "8081")
    assert refused["outcome"] == "refused", refused
    if cloud.datapath == "ebpf":
        assert ("203.0.113.12", 8081, 6) not in t1_ebpf.mapping_keys(cloud.state, "h1")
    else:
        assert not any("nw_dst=203.0.113.12" in f and "tp_dst=8081" in f for f in cloud.flows())
    assert whoami_from_inet(cloud, "203.0.113.12", 80)["name"] == "tmp1"
    cloud.cli("rm", "tmp1")
    mac = str(info["mac"])
    if cloud.datapath == "ebpf":
        cloud.wait_for(lambda: mac not in t1_ebpf.macs(cloud.state, "h1"))
        assert not any(k[0] == "203.0.113.12" for k in t1_ebpf.mapping_keys(cloud.state, "h1"))
        assert "203.0.113.12" not in t1_ebpf.public_ips(cloud.state, "h1"), "no entry for a public IP nobody holds"
    else:
        cloud.wait_for(lambda: not any(mac in f for f in cloud.flows()))
        assert not any("203.0.113.12" in f for f in cloud.flows()), "no flow for a public IP nobody holds"
    refused = cloud.tool("inet", "tcp-refused", "--host", "203.0.113.12", "--port", "80")
    assert refused["outcome"] != "connected", refused
    ns = cloud.state.ns("c-tmp1")
    cloud.wait_for(lambda: not node.exists(ns))
