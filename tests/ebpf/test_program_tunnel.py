"""Two hosts: the gateway h1 (conftest.Dplab) and a compute host h2 whose container c shares
203.0.113.10 too, joined by kernel VXLAN devices (``vx-h2`` on h1, ``vx-h1`` on h2) over an
underlay veth (198.19.0.1/2, a protected network). h2's maps have no gateway flag: its way out is
the tunnel to h1, where pm_from_tunnel routes it; inet reaches c through h1's uplink program,
which hands the frame to the tunnel already addressed to c's MAC.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from portmesh.agent.ebpf import layout

from .conftest import INET, PUBLIC, PY, Dplab, Sharer, sh

D = layout.DropReason
VXLAN_MTU = 1450  # 1500 of the underlay minus VXLAN's 50


class Twohost(Dplab):
    """Dplab plus the compute host h2 with container c, tunnels both ways."""

    def __init__(self, prefix: str, obj: Path) -> None:
        super().__init__(prefix, obj)
        self.h2 = f"{prefix}2"
        self.pin2 = Path(f"/run/portmesh-test/{prefix}-2")
        self.c = Sharer("c", "0a:00:00:00:00:0c", 34816, 1024, 8083)

    def build(self) -> None:
        super().build()
        self.netns(self.h2)
        self.x(self.h2, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh("ip", "-n", self.host, "link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns", self.h2)
        for ns, me, peer, vx in ((self.host, "198.19.0.1", "198.19.0.2", "vx-h2"),
                                 (self.h2, "198.19.0.2", "198.19.0.1", "vx-h1")):
            self.x(ns, "ip", "addr", "add", f"{me}/24", "dev", "ul0")
            self.x(ns, "ip", "link", "set", "ul0", "up")
            self.x(ns, "ip", "link", "add", vx, "type", "vxlan", "id", "42", "local", me, "remote", peer,
                "dstport", "4789", "dev", "ul0")
            self.x(ns, "ip", "link", "set", vx, "up")
        self.container(self.c, host=self.h2, mtu=VXLAN_MTU)
        tunnel1, tunnel2 = self.ifindex(self.host, "vx-h2"), self.ifindex(self.h2, "vx-h1")
        # h1: c lives behind the tunnel (owner 0: no local port owns it).
        self.add_dest(self.pin, self.c, layout.Dest(mac=layout.mac_bytes(self.c.mac), flags=layout.DEST_TUNNEL,
                                                    ifindex=tunnel1, owner=0))
        self.attach(None, "pm_from_tunnel=vx-h2")
        # h2: a compute host, its own pinned maps.
        self.mount(self.pin2)
        self.x(self.h2, PY, "-m", "tests.ebpf.nstool", "load", str(self.obj), str(self.pin2))
        self.fill_host(self.pin2, gateway_tunnel=tunnel2)
        self.add_port(self.pin2, self.c)
        self.add_dest(self.pin2, self.c, self.local(self.c))
        for other in (self.a, self.b):
            self.add_dest(self.pin2, other, layout.Dest(mac=layout.mac_bytes(other.mac), flags=layout.DEST_TUNNEL,
                                                        ifindex=tunnel2, owner=0))
        self.x(self.h2, PY, "-m", "tests.ebpf.nstool", "attach", str(self.obj), str(self.pin2),
               "pm_from_container=vc", "pm_from_tunnel=vx-h1")


@pytest.fixture(scope="module")
def twohost(datapath_object: Path) -> Iterator[Twohost]:
    lab = Twohost(f"pt{os.getpid() % 10000}", datapath_object)
    try:
        lab.build()
        for c in (lab.a, lab.b, lab.c):
            lab.whoami(c.ns, c.name, [c.port], [c.port])
        lab.whoami(lab.inet, "inet", [9000], [9000])
        yield lab
    finally:
        lab.close()


def reply(lab: Dplab, ns: str, proto: str, host: str, port: int) -> dict[str, str]:
    out = lab.tool(ns, "clients.py", proto, "--host", host, "--port", str(port))
    assert out["ok"] == 1, out
    got = out["replies"]
    assert isinstance(got, list)
    first: dict[str, str] = got[0]
    return first


def test_inet_reaches_the_compute_hosts_container_through_the_gateway(twohost: Twohost) -> None:
    c = twohost.c
    for proto in ("tcp", "udp"):
        got = reply(twohost, twohost.inet, proto, str(PUBLIC), c.port)
        assert got["name"] == "c" and got["client"].split(":")[0] == INET, got
        # Control: h1's own sharer on the same address, the same moment.
        assert reply(twohost, twohost.inet, proto, str(PUBLIC), twohost.a.port)["name"] == "a"


def test_compute_hosts_container_reaches_inet_through_the_gateway(twohost: Twohost) -> None:
    c = twohost.c
    for proto in ("tcp", "udp"):
        got = reply(twohost, c.ns, proto, INET, 9000)
        ip, port = got["client"].split(":")
        assert ip == str(PUBLIC) and c.block <= int(port) < c.block + c.block_size, got


def test_sharers_across_hosts(twohost: Twohost) -> None:
    a, c = twohost.a, twohost.c
    got = reply(twohost, a.ns, "tcp", str(PUBLIC), c.port)
    assert got["name"] == "c" and a.block <= int(got["client"].split(":")[1]) < a.block + a.block_size, got
    got = reply(twohost, c.ns, "udp", str(PUBLIC), a.port)
    assert got["name"] == "a" and c.block <= int(got["client"].split(":")[1]) < c.block + c.block_size, got


def test_compute_host_fence_and_split_horizon(twohost: Twohost) -> None:
    """From c: the underlay (protected) and the gateway host's own address stay unreachable."""
    c = twohost.c
    before1, before2 = twohost.drops(), twohost.drops(twohost.pin2)
    targets = ["198.19.0.1:22", "198.51.100.1:22", f"{INET}:9000"]
    out = twohost.tool(c.ns, "probes.py", "tcp-probe", "--timeout", "1", *targets)
    results = out["results"]
    assert isinstance(results, list)
    outcome = {t: r["outcome"] for t, r in zip(targets, results, strict=True)}
    assert outcome == {"198.19.0.1:22": "timeout", "198.51.100.1:22": "timeout", f"{INET}:9000": "connected"}, outcome
    # The underlay is fenced on h2 itself; the host's uplink address only by h1's fib (a local address).
    assert twohost.drops(twohost.pin2)[D.FENCE] > before2[D.FENCE]
    assert twohost.drops()[D.FENCE] > before1[D.FENCE]


def test_compute_hosts_container_pings_inet_and_hears_its_errors(twohost: Twohost) -> None:
    """The echo reply and inet's port unreachable find c through h1 (echo map / c's block on h1)."""
    c = twohost.c
    twohost.x(c.ns, "ping", "-c2", "-i0.2", "-W1", INET)
    out = twohost.tool(c.ns, "clients.py", "udp-refused", "--host", INET, "--port", "9")
    assert out["outcome"] == "refused", out


def test_bulk_both_ways_through_the_tunnel(twohost: Twohost) -> None:
    """GSO packets both ways across the VXLAN hop (c's MTU leaves room for the encapsulation)."""
    c = twohost.c
    server = twohost.start(twohost.inet, "stdbuf", "-oL", "iperf3", "-s", "-p", "5302", ready="Server listening")
    for reverse in ([], ["-R"]):  # c -> inet, then inet -> c
        out = json.loads(twohost.x(c.ns, "iperf3", "-c", INET, "-p", "5302", "-t", "1", "-J", *reverse, timeout=30))
        assert out["end"]["sum_received"]["bytes"] > 10_000_000, (reverse, out["end"]["sum_received"])
    twohost.stop(server)


def test_compute_hosts_container_gets_the_gateway_hops_errors(twohost: Twohost) -> None:
    """c's TTL-1 probe is answered by h1's gateway hop back through the tunnel (time exceeded from
    169.254.1.1, checksums valid); with h1's uplink narrowed, c's DF probe gets fragmentation needed
    and a TCP upload (TSO, GRO'd again by h1's VXLAN device) learns the path MTU and completes."""
    from .test_program_icmp_errors import BULK, NARROW_MTU, SINK, check_error, first_error, probe

    c = twohost.c
    assert probe(twohost, c.ns, "--ttl", "2")["replies"] == 1  # control: one hop to spare
    before = twohost.drops()
    result = probe(twohost, c.ns, "--ttl", "1")
    assert result["errors"] == 1 and result["replies"] == 0, result
    src, data = first_error(result)
    assert src == "169.254.1.1" and check_error(data, 11, 0, 1, int(str(result["sport"])), 9000) == 0
    assert twohost.drops()[D.TTL_EXCEEDED] - before[D.TTL_EXCEEDED] == 1
    sink = twohost.start(twohost.inet, PY, "-u", "-c", SINK, ready="ready")
    twohost.x(twohost.host, "ip", "link", "set", "up0", "mtu", str(NARROW_MTU))
    try:
        big = probe(twohost, c.ns, "--df", "--size", "1300")
        assert big["errors"] == 1 and big["replies"] == 0, big
        assert check_error(first_error(big)[1], 3, 4, 64, int(str(big["sport"])), 9000) == NARROW_MTU
        twohost.x(c.ns, "ip", "route", "flush", "cache")
        upload = json.loads(twohost.x(c.ns, PY, "-c", BULK, "200000", timeout=30))
    finally:
        twohost.x(twohost.host, "ip", "link", "set", "up0", "mtu", "1500")
        twohost.x(c.ns, "ip", "route", "flush", "cache")
        twohost.stop(sink)
    assert upload["reply"] == "200000" and f"mtu {NARROW_MTU}" in upload["route"], upload
