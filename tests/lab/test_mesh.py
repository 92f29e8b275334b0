"""Tier 3, issue 12 item 2: the agents build the VXLAN mesh from the store, and keep it sealed.

One 3-host lab for the module (h1 gateway, h2/h3 compute, an underlay of its own). Asserted
on each host's kernel (``ip -d link``), its switch (br0's ports, ovs-vswitchd's datapath
flows) and the store (the agents' tunnel reports):

- the mesh comes up: on every host one device per peer with the right vni/local/remote/port,
  on br0, reported up; a host added later gets tunnels everywhere; a removed host's tunnels
  (device, br0 port, isolation chain, firewall peer) go everywhere;
- a deleted tunnel device is remade by the agent's full pass, and ovs-vswitchd reads the new
  device (a frame sent through it reaches the datapath);
- hostile: VXLAN to UDP 4789 from a non-peer address is dropped (the same packet from a
  peer's address arrives: positive control); a decapsulated frame addressed to the host
  itself is not processed by the host kernel (positive control: without its isolation
  chain it is; the full pass then puts the chain back).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from portmesh.agent.ebpf.layout import DropReason
from portmesh.agent.tunnels import pair_vni
from portmesh.lab import link, node, services
from portmesh.lab.network import UPLINK_IP, Lab, ovs_of
from portmesh.lab.state import LabState
from portmesh.model.config import DEFAULT_CONFIG as CFG
from portmesh.model.entities import tunnel_port_for
from portmesh.store.client import Store
from tests.lab.conftest import lab_suffix
from tests.lab.test_mapping_e2e import keep_logs, pytestmark
from tests.lab.tools import t2_ebpf, t4_ebpf

__all__ = ["pytestmark"]

UNDERLAY = "198.19.0"
ROGUE_IP = f"{UNDERLAY}.99"
PROBE_SENDER_IP = "198.51.100.250"  # the inner ARP request's sender: a neighbour entry names it if h1's kernel saw it
PROBE_SENDER_MAC = "02:00:00:00:99:01"

# Sends VXLAN packets (UDP to argv[1]:argv[2], from source address argv[8] if given) carrying one
# inner Ethernet frame: an ARP request who-has argv[5] from argv[6]/argv[7], VNI argv[3], argv[4] times.
SEND_VXLAN = r"""
import socket, struct, sys
dst, port, vni, count, target, sip, smac = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:8]
src = sys.argv[8] if len(sys.argv) > 8 else ""
mac = bytes.fromhex(smac.replace(":", ""))
arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + socket.inet_aton(sip) + b"\0" * 6 + socket.inet_aton(target)
frame = b"\xff" * 6 + mac + b"\x08\x06" + arp + b"\0" * 18
header = struct.pack("!II", 0x08000000, vni << 8)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if src:
    s.bind((src, 0))
for _ in range(count):
    s.sendto(header + frame, (dst, port))
"""


def uip(host: str) -> str:
    return f"{UNDERLAY}.{10 + int(host[1:])}"


def sh(ns: str, *argv: str, check: bool = True) -> str:
    return node.run(list(argv), netns=ns, check=check, timeout=30).stdout


def wait_until(cond: Callable[[], object], timeout: float, what: str) -> float:
    """Poll ``cond`` until truthy; the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout}s"
        time.sleep(0.2)
    return time.monotonic() - t0


class Mesh:
    """The lab and the views of it the tests compare."""

    def __init__(self, lab: Lab, state: LabState, store: Store, datapath: str = "ovs") -> None:
        self.lab, self.state, self.store, self.datapath = lab, state, store, datapath

    def hosts(self) -> list[str]:
        current = self.lab.state()
        assert current is not None
        return list(current.hosts)

    def ns(self, host: str) -> str:
        return self.state.ns(host)

    def ovs(self, host: str, *argv: str) -> str:
        o = ovs_of(self.state, host)
        return node.run(list(argv), netns=o.netns, env=o.env(), check=True, timeout=30).stdout

    def appctl(self, host: str, *argv: str) -> str:
        return self.ovs(host, "ovs-appctl", "-t", str(ovs_of(self.state, host).rundir / "ovs-vswitchd.ctl"), *argv)

    def devices(self, host: str) -> dict[str, tuple[int, str, str, int, str, bool]]:
        """VXLAN devices on ``host``: name -> (vni, local, remote, dstport, dev, learning)."""
        out = {}
        for d in json.loads(sh(self.ns(host), "ip", "-d", "-j", "link", "show", "type", "vxlan")):
            data = d["linkinfo"]["info_data"]
            out[d["ifname"]] = (data["id"], data.get("local"), data.get("remote"), data["port"], data.get("link"),
                                bool(data.get("learning")))
        return out

    def expected(self, host: str, hosts: list[str]) -> dict[str, tuple[int, str, str, int, str, bool]]:
        return {
            tunnel_port_for(p): (pair_vni(CFG.vxlan_vni, host, p), uip(host), uip(p), CFG.vxlan_port, "ul0", False)
            for p in hosts if p != host
        }

    def on_ebpf(self, host: str) -> bool:
        """Per host, as the lab recorded it: a host added to an eBPF lab runs OVS (Lab.add_host has no datapath)."""
        current = self.lab.state()
        return (current or self.state).datapath(host) == "ebpf"

    def ports(self, host: str) -> set[str]:
        """br0's ports; on an eBPF host (no br0) the devices whose ingress runs the datapath's program."""
        if self.on_ebpf(host):
            return set(t2_ebpf.program_ports(self.ns(host)))
        return set(self.ovs(host, "ovs-vsctl", "list-ports", "br0").split())

    def chains(self, host: str) -> str:
        """The isolation chains (an eBPF host has them too, behind its tunnel program)."""
        return sh(self.ns(host), "nft", "list", "table", "netdev", "portmesh", check=False)

    def reported(self, host: str) -> dict[str, str]:
        return dict(self.store.host_status(host).tunnels)

    def mesh_is(self, hosts: list[str]) -> bool:
        """Every host of ``hosts`` has exactly its tunnels to the others, on br0, and reports them all up."""
        for h in hosts:
            want = self.expected(h, hosts)
            if self.devices(h) != want or not set(want) <= self.ports(h):
                return False
            if {p for p in self.ports(h) if p.startswith("vx")} != set(want):
                return False
            if self.reported(h) != {p: "up" for p in hosts if p != h}:
                return False
        return True

    def peer_set(self, host: str) -> set[tuple[str, int]]:
        """The (address, VNI) pairs ``host``'s firewall accepts VXLAN from."""
        objects = json.loads(sh(self.ns(host), "nft", "-j", "list", "set", "inet", "portmesh", "tunnel_peers"))["nftables"]
        return {(e["concat"][0], e["concat"][1]) for o in objects if "set" in o for e in o["set"].get("elem", [])}

    def rx(self, host: str, dev: str) -> int:
        stats = json.loads(sh(self.ns(host), "ip", "-s", "-j", "link", "show", dev))[0]["stats64"]["rx"]
        return int(stats["packets"])

    def send_vxlan(self, from_ns: str, to_host: str, vni: int, count: int = 5, target: str = "", to_ip: str = "",
                   from_ip: str = "") -> None:
        argv = [sys.executable, "-c", SEND_VXLAN, to_ip or uip(to_host), str(CFG.vxlan_port), str(vni), str(count),
                target or uip(to_host), PROBE_SENDER_IP, PROBE_SENDER_MAC] + ([from_ip] if from_ip else [])
        node.run(argv, netns=from_ns, check=True, timeout=30)


@pytest.fixture(scope="module")
def mesh(datapath: str) -> Iterator[Mesh]:
    lab = Lab(f"ms{os.getpid() % 10000}{lab_suffix(datapath)}", say=lambda _msg: None)
    store: Store | None = None
    try:
        state = lab.up(hosts=3, datapath=datapath)
        store = Store(services.store_remote(state.dir), tables=("Global", "Host"))
        store.start()
        m = Mesh(lab, state, store, datapath)
        wait_until(lambda: m.mesh_is(["h1", "h2", "h3"]), 60, "the 3-host mesh")
        yield m
    finally:
        if store is not None:
            store.close()
        keep_logs(lab)
        lab.down()


def test_mesh_comes_up_with_the_right_devices_on_br0_reported_up(mesh: Mesh) -> None:
    for h in ["h1", "h2", "h3"]:
        devices = mesh.devices(h)
        assert devices == mesh.expected(h, ["h1", "h2", "h3"])
        assert set(devices) <= mesh.ports(h)
        for name in devices:
            assert f"chain {name}" in mesh.chains(h)  # isolated like a container port
            mtu = json.loads(sh(mesh.ns(h), "ip", "-j", "link", "show", name))[0]["mtu"]
            assert mtu == 1450  # underlay 1500 - 50
        assert mesh.reported(h) == {p: "up" for p in ["h1", "h2", "h3"] if p != h}
    # The firewall takes VXLAN from exactly the peers, each with its own tunnel's VNI; compute hosts
    # forward nothing from br0.
    for h in ("h1", "h2", "h3"):
        assert mesh.peer_set(h) == {(uip(p), pair_vni(CFG.vxlan_vni, h, p)) for p in ("h1", "h2", "h3") if p != h}
    fw1, fw2 = (sh(mesh.ns(h), "nft", "list", "table", "inet", "portmesh") for h in ("h1", "h2"))
    compute_rule = "iifname \"br0\" drop comment \"a compute host"
    assert compute_rule in fw2 and compute_rule not in fw1


def test_a_host_added_later_gets_tunnels_everywhere_and_a_removed_one_leaves_none(mesh: Mesh) -> None:
    added = mesh.lab.add_host()
    try:
        took = wait_until(lambda: mesh.mesh_is(["h1", "h2", "h3", added]), 60, f"tunnels to {added}")
        print(f"mesh with {added}: {took:.1f} s")
        assert uip(added) in sh(mesh.ns("h1"), "nft", "list", "set", "inet", "portmesh", "tunnel_peers")
    finally:
        assert mesh.lab.remove_host(added) == []
    took = wait_until(lambda: mesh.mesh_is(["h1", "h2", "h3"]), 60, f"{added}'s tunnels gone")
    print(f"mesh without {added}: {took:.1f} s")
    gone = tunnel_port_for(added)
    for h in ["h1", "h2", "h3"]:
        assert gone not in mesh.devices(h) and gone not in mesh.ports(h) and gone not in mesh.chains(h)
        assert added not in mesh.reported(h)
        assert uip(added) not in sh(mesh.ns(h), "nft", "list", "set", "inet", "portmesh", "tunnel_peers")


def test_a_deleted_tunnel_device_is_remade_and_ovs_reads_the_new_one(mesh: Mesh) -> None:
    dev = tunnel_port_for("h3")
    before = json.loads(sh(mesh.ns("h2"), "ip", "-j", "link", "show", dev))[0]["ifindex"]
    sh(mesh.ns("h2"), "ip", "link", "del", dev)
    took = wait_until(lambda: mesh.mesh_is(["h1", "h2", "h3"]), 30, f"{dev} remade on h2")
    after = json.loads(sh(mesh.ns("h2"), "ip", "-j", "link", "show", dev))[0]["ifindex"]
    assert after != before
    print(f"deleted tunnel device remade and reported up in {took:.1f} s")
    if mesh.on_ebpf("h2"):
        # The program is attached to the new device (mesh_is checked it) and reads its frames: the
        # ARP from h3 (for no local port) is dropped by it as TUNNEL, counted in h2's drops map.
        assert t2_ebpf.program_ports(mesh.ns("h2")).get(dev) == "pm_from_tunnel"
        before_drops = t4_ebpf.drops(mesh.state, "h2")[DropReason.TUNNEL]

        def seen() -> bool:
            mesh.send_vxlan(mesh.ns("h3"), "h2", pair_vni(CFG.vxlan_vni, "h2", "h3"), count=1)
            return t4_ebpf.drops(mesh.state, "h2")[DropReason.TUNNEL] > before_drops
    else:
        ofport = int(mesh.ovs("h2", "ovs-vsctl", "get", "Interface", dev, "ofport"))
        assert ofport > 0
        # ovs-vswitchd reads the new device, not the deleted one: a frame from h3 reaches h2's datapath.
        mesh.appctl("h2", "dpctl/del-flows")

        def seen() -> bool:
            mesh.send_vxlan(mesh.ns("h3"), "h2", pair_vni(CFG.vxlan_vni, "h2", "h3"), count=1)
            return f"in_port({dev})" in mesh.appctl("h2", "dpctl/dump-flows", "--names")

    wait_until(seen, 10, f"a frame through the remade {dev} in h2's datapath")
    # ... and the remade device is isolated like the first: h2's kernel never processes its frames.
    sh(mesh.ns("h2"), "ip", "neigh", "flush", "dev", dev)
    start = mesh.rx("h2", dev)
    mesh.send_vxlan(mesh.ns("h3"), "h2", pair_vni(CFG.vxlan_vni, "h2", "h3"), count=5)
    wait_until(lambda: mesh.rx("h2", dev) >= start + 5, 5, "frames decapsulated on the remade device")
    time.sleep(0.2)  # the kernel would have handled them in the softirq that counted them
    assert PROBE_SENDER_IP not in sh(mesh.ns("h2"), "ip", "neigh", "show", "dev", dev)


def test_an_agent_restart_remakes_no_tunnel(mesh: Mesh) -> None:
    def identity(host: str) -> dict[str, object]:
        links = {d["ifname"]: d["ifindex"] for d in json.loads(sh(mesh.ns(host), "ip", "-j", "link", "show", "type", "vxlan"))}
        if mesh.on_ebpf(host):
            # No OpenFlow ports: the tc filter slot (pref, handle, program name) stands for them, and
            # the pinned maps must be the same kernel maps. The program id is left out: a restarted
            # agent loads the object again (a new program id) into the same slot, by design
            # (ebpf-spec: "a reloaded object reuses the pinned maps: traffic never stops").
            ofports: dict[str, object] = {n: [f[:3] for f in t2_ebpf.ingress_filters(mesh.ns(host), n)] for n in links}
            ofports["maps"] = t4_ebpf.map_ids(mesh.state, host)
        else:
            ofports = {n: mesh.ovs(host, "ovs-vsctl", "get", "Interface", n, "ofport").strip() for n in links}
        chains = {n: line for line in mesh.chains(host).splitlines() for n in links if f"chain {n}" in line}
        handles = json.loads(sh(mesh.ns(host), "nft", "-j", "-a", "list", "table", "netdev", "portmesh"))
        chain_handles = {o["chain"]["name"]: o["chain"]["handle"] for o in handles["nftables"] if "chain" in o}
        return {"links": links, "ofports": ofports, "chains": chains,
                "handles": {n: chain_handles.get(n) for n in links}}

    before = identity("h2")
    current = mesh.lab.state()
    old = current.process("agent:h2") if current is not None else None
    assert old is not None
    mark = "tunnels of h2: 2 up, 0 down"  # logged by each agent process once its first pass has checked them
    seen_before = Path(old.log).read_text().count(mark)
    proc = mesh.lab.restart("agent:h2")
    wait_until(lambda: Path(proc.log).read_text().count(mark) > (seen_before if proc.log == old.log else 0), 30,
               "the restarted agent's check of its tunnels")
    assert mesh.mesh_is(["h1", "h2", "h3"])
    assert identity("h2") == before


@pytest.fixture
def rogue(mesh: Mesh) -> Iterator[str]:
    """A namespace on the underlay with an address no host has (made and removed by this test)."""
    ns, mgmt = f"{mesh.state.prefix}rogue", mesh.ns("mgmt")
    node.create(ns)
    try:
        link.veth(ns, "ul0", mgmt, "u-rogue", mtu=1500)
        link.enslave(mgmt, "u-rogue", "ul0")
        link.address(ns, "ul0", f"{ROGUE_IP}/24")
        yield ns
    finally:
        if "u-rogue" in link.links(mgmt):
            link.delete(mgmt, "u-rogue")
        node.remove(ns)


def test_vxlan_from_a_non_peer_address_is_dropped_and_from_a_peer_it_arrives(mesh: Mesh, rogue: str) -> None:
    dev, vni = tunnel_port_for("h2"), pair_vni(CFG.vxlan_vni, "h1", "h2")  # h1's device from h2
    # Underlay reachability first, so a drop below is the firewall's and not a missing path.
    sh(rogue, "ping", "-c", "1", "-W", "2", uip("h1"))
    start = mesh.rx("h1", dev)
    mesh.send_vxlan(rogue, "h1", vni, count=5)
    # The same packets from the peer h2, sent after: once they are counted, the rogue's (sent
    # first, over the same bridge) would have been too.
    mesh.send_vxlan(mesh.ns("h2"), "h1", vni, count=5)
    wait_until(lambda: mesh.rx("h1", dev) >= start + 5, 5, "VXLAN from the peer h2 (positive control)")
    assert mesh.rx("h1", dev) == start + 5, "VXLAN from a non-peer address reached the tunnel device"


def test_a_peer_cannot_pose_as_another_peer_on_its_tunnel(mesh: Mesh) -> None:
    """h3 is a peer of h1, but frames with the h1-h2 VNI must come from h2: else h3 speaks on h2's port of br0."""
    dev, vni = tunnel_port_for("h2"), pair_vni(CFG.vxlan_vni, "h1", "h2")
    start = mesh.rx("h1", dev)
    mesh.send_vxlan(mesh.ns("h3"), "h1", vni, count=5)
    mesh.send_vxlan(mesh.ns("h2"), "h1", vni, count=5)  # positive control, sent after
    wait_until(lambda: mesh.rx("h1", dev) >= start + 5, 5, "VXLAN from h2 on its own VNI (positive control)")
    assert mesh.rx("h1", dev) == start + 5, "h3's VXLAN with the h1-h2 VNI reached h1's tunnel device to h2"
    # h3 on its own VNI does arrive, on h1's device to h3.
    dev3, start3 = tunnel_port_for("h3"), mesh.rx("h1", tunnel_port_for("h3"))
    mesh.send_vxlan(mesh.ns("h3"), "h1", pair_vni(CFG.vxlan_vni, "h1", "h3"), count=5)
    wait_until(lambda: mesh.rx("h1", dev3) >= start3 + 5, 5, "VXLAN from h3 on its own VNI")


def test_vxlan_claiming_a_peer_address_from_the_internet_is_dropped(mesh: Mesh) -> None:
    """The kernel's VXLAN socket listens on every address: a peer's source address is trusted on the underlay only."""
    dev, vni, h1, inet = tunnel_port_for("h2"), pair_vni(CFG.vxlan_vni, "h1", "h2"), mesh.ns("h1"), mesh.ns("inet")
    sh(inet, "ip", "addr", "add", f"{uip('h2')}/32", "dev", "eth0")  # inet poses as h2
    try:
        start = mesh.rx("h1", dev)
        mesh.send_vxlan(inet, "h1", vni, count=5, to_ip=UPLINK_IP, from_ip=uip("h2"))
        mesh.send_vxlan(mesh.ns("h2"), "h1", vni, count=5)  # the real h2, after: counted once both are in
        wait_until(lambda: mesh.rx("h1", dev) >= start + 5, 5, "VXLAN from the real h2 (positive control)")
        assert mesh.rx("h1", dev) == start + 5, "VXLAN from the internet with a peer's address reached the tunnel"

        # Positive control: without h1's firewall the forged packets do reach the tunnel device.
        def forged_arrives() -> bool:
            if "table inet portmesh" in sh(h1, "nft", "list", "tables"):  # the agent's full pass was quicker
                sh(h1, "nft", "delete", "table", "inet", "portmesh")
            before = mesh.rx("h1", dev)
            mesh.send_vxlan(inet, "h1", vni, count=1, to_ip=UPLINK_IP, from_ip=uip("h2"))
            time.sleep(0.1)
            return mesh.rx("h1", dev) > before

        wait_until(forged_arrives, 5, "forged VXLAN arriving without the firewall (positive control)")
        wait_until(lambda: "table inet portmesh" in sh(h1, "nft", "list", "tables"), 30, "h1's firewall back")
    finally:
        sh(inet, "ip", "addr", "del", f"{uip('h2')}/32", "dev", "eth0", check=False)


def test_a_decapsulated_frame_for_the_host_itself_never_reaches_its_kernel(mesh: Mesh) -> None:
    dev, vni, h1 = tunnel_port_for("h2"), pair_vni(CFG.vxlan_vni, "h1", "h2"), mesh.ns("h1")

    def kernel_saw_it() -> bool:
        return PROBE_SENDER_IP in sh(h1, "ip", "neigh", "show", "dev", dev)

    sh(h1, "ip", "neigh", "flush", "dev", dev)
    start = mesh.rx("h1", dev)
    # An ARP request for h1's own underlay address, decapsulated on h1's tunnel device from h2.
    mesh.send_vxlan(mesh.ns("h2"), "h1", vni, count=5)
    wait_until(lambda: mesh.rx("h1", dev) >= start + 5, 5, "the frames decapsulated on h1")
    time.sleep(0.2)  # the kernel would have handled them in the same softirq that counted them
    assert not kernel_saw_it(), "h1's kernel processed a decapsulated frame"
    # Positive control: without the isolation chain (eBPF: the tunnel program) h1's kernel does
    # process it (neighbour entry for the ARP's sender), until the agent's full pass puts it back.
    ebpf = mesh.on_ebpf("h1")

    def isolated() -> bool:
        return f"chain {dev}" in mesh.chains("h1") or (ebpf and dev in mesh.ports("h1"))

    def unisolate() -> None:  # on eBPF the tunnel program stands in front of the chain: both go
        if f"chain {dev}" in mesh.chains("h1"):
            sh(h1, "nft", "delete", "chain", "netdev", "portmesh", dev)
        if ebpf and dev in mesh.ports("h1"):
            sh(h1, "tc", "qdisc", "del", "dev", dev, "clsact")

    unisolate()

    def probe() -> bool:
        if isolated():  # the agent's full pass was quicker: again
            unisolate()
        mesh.send_vxlan(mesh.ns("h2"), "h1", vni, count=1)
        return kernel_saw_it()

    wait_until(probe, 5, "h1's kernel answering without the isolation chain (positive control)")
    took = wait_until(lambda: f"chain {dev}" in mesh.chains("h1") and (not ebpf or dev in mesh.ports("h1")), 30,
                      "the isolation chain (and on eBPF the tunnel program) put back")
    print(f"tunnel isolation chain restored by the full pass in {took:.1f} s")
    sh(h1, "ip", "neigh", "flush", "dev", dev)
    start = mesh.rx("h1", dev)
    mesh.send_vxlan(mesh.ns("h2"), "h1", vni, count=5)
    wait_until(lambda: mesh.rx("h1", dev) >= start + 5, 5, "the frames decapsulated on h1 again")
    time.sleep(0.2)
    assert not kernel_saw_it()


def public_source_frame(dst_ip: str) -> str:
    """Hex of an Ethernet/IPv4/UDP frame from a public pool address to ``dst_ip``, for the gateway MAC (br0)."""
    payload = b"portmesh-forward-probe"
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0) + payload
    src = socket.inet_aton("203.0.113.50")
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, src, socket.inet_aton(dst_ip))
    words = sum(struct.unpack("!10H", header))
    while words >> 16:
        words = (words & 0xFFFF) + (words >> 16)
    header = header[:10] + struct.pack("!H", ~words & 0xFFFF) + header[12:]
    eth = bytes.fromhex(CFG.gateway_mac.replace(":", "")) + bytes.fromhex("020000009902") + b"\x08\x00"
    return (eth + header + udp).hex()


def test_a_compute_host_forwards_nothing_that_arrives_on_br0(mesh: Mesh) -> None:
    """Defence in depth behind the flows: a frame OVS hands a compute host's kernel is never routed out."""
    if mesh.on_ebpf("h2"):
        pytest.skip("OVS only: injects through br0's LOCAL port (packet-out); an eBPF host has no br0, its tunnel "
                    "program hands no frame to the host kernel (test_a_decapsulated_frame_... asserts that)")

    def tx(ns: str, dev: str) -> int:
        return int(json.loads(sh(ns, "ip", "-s", "-j", "link", "show", dev))[0]["stats64"]["tx"]["packets"])

    def inject(host: str, dst: str, count: int = 5) -> None:
        for _ in range(count):
            mesh.ovs(host, "ovs-ofctl", "-O", "OpenFlow13", "packet-out", "br0",
                     f"in_port=controller packet={public_source_frame(dst)} actions=output:LOCAL")

    # Positive control: the gateway host h1 routes such a frame out of its uplink to inet.
    start = tx(mesh.ns("h1"), "up0")
    inject("h1", "198.51.100.2")
    wait_until(lambda: tx(mesh.ns("h1"), "up0") >= start + 5, 5, "h1 forwarding to inet (positive control)")
    # h2, given an uplink of the same shape for this test, forwards nothing from br0.
    h2 = mesh.ns("h2")
    sh(h2, "ip", "link", "add", "pmx0", "type", "veth", "peer", "name", "pmx1")
    try:
        for dev in ("pmx0", "pmx1"):  # no IPv6 chatter on the counted device
            sh(h2, "sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1")
        sh(h2, "ip", "addr", "add", "198.51.100.1/24", "dev", "pmx0")
        sh(h2, "ip", "link", "set", "pmx1", "up")
        sh(h2, "ip", "link", "set", "pmx0", "up")
        sh(h2, "ip", "neigh", "replace", "198.51.100.2", "lladdr", "02:00:00:00:99:03", "dev", "pmx0")
        start = tx(h2, "pmx0")
        inject("h2", "198.51.100.2")
        # Bounded look: the same injection took h1 well under this to forward.
        time.sleep(0.5)
        assert tx(h2, "pmx0") == start, "a compute host routed public-source traffic from br0 out of its uplink"
        # Positive control on h2 itself: without its firewall table, the same frames are routed out.
        def forwarded_without_firewall() -> bool:
            if "table inet portmesh" in sh(h2, "nft", "list", "tables"):  # the agent's full pass was quicker
                sh(h2, "nft", "delete", "table", "inet", "portmesh")
            inject("h2", "198.51.100.2", count=1)
            return tx(h2, "pmx0") > start

        wait_until(forwarded_without_firewall, 5, "h2 forwarding without its firewall (positive control)")
        took = wait_until(lambda: "table inet portmesh" in sh(h2, "nft", "list", "tables"), 30, "h2's firewall back")
        print(f"compute host firewall restored by the full pass in {took:.1f} s")
    finally:
        sh(h2, "ip", "link", "del", "pmx0", check=False)
