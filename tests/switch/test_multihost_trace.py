"""Tier 2: one real controller programs three switches (three dummy-datapath ovs-vswitchd), checked with ofproto/trace.

Each switch stands for one host: h1 the gateway, h2 and h3 compute hosts. Its
ports are its containers' (1, 2, ...) and dummy ports named like the kernel
VXLAN devices leading to the other hosts (101 leads to h1, 102 to h2, 103 to
h3). A trace follows a frame through one switch; where it leaves by a tunnel
port, the next trace starts on the switch of the host that port leads to.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from os_ken.lib import pcaplib
from os_ken.lib.packet import ethernet, packet

from portmesh.lab.dummy_ovs import DummyOVS
from portmesh.model.config import DEFAULT_CONFIG as CFG
from portmesh.model.entities import DesiredState, Host, HostRole, MappingKey, Proto
from portmesh.model.validation import new_container, new_mapping
from tests.switch.conftest import ControllerThread, MemoryState
from tests.switch.test_icmp_trace import echo, error, icmp_of, quoted
from tests.switch.test_pipeline_trace import last_actions, of_outputs

pytestmark = pytest.mark.switch

IP10 = IPv4Address("203.0.113.10")
OUTSIDE = "198.51.100.2"
HOSTS = ("h1", "h2", "h3")
TUNNEL_NO = {"h1": 101, "h2": 102, "h3": 103}
# (container, host, mapped tcp port on 203.0.113.10): two hosts share the IP by port, h1 has one too
PLACES = (("a", "h1", 22), ("b", "h2", 80), ("c", "h3", 443))


def build_state() -> DesiredState:
    hosts = {n: Host(n, i, IPv4Address(f"198.19.0.{10 + i}"), HostRole.GATEWAY if n == "h1" else HostRole.COMPUTE)
             for i, n in enumerate(HOSTS, 1)}
    state = DesiredState(hosts=hosts)
    for name, host, port in PLACES:
        c = new_container(state, CFG, name=name, host=host, ips=[IP10])
        state = replace(state, containers={**state.containers, name: c})
        m = new_mapping(state, MappingKey(IP10, Proto.TCP, port), name)
        state = replace(state, mappings={**state.mappings, m.key: m})
    return state


class Cloud:
    """Three switches under one controller."""

    def __init__(self, tmp_path: Path, state: DesiredState) -> None:
        self.state = state
        self.source = MemoryState(state)
        for host in HOSTS:
            (tmp_path / host).mkdir()
        # ovs-vswitchd connects only to sockets in its own run directory: one listening socket per switch.
        self.ctl = ControllerThread(self.source, tmp_path / "h1" / "ctl.sock").start()
        self._servers: list[asyncio.AbstractServer] = []
        for host in HOSTS[1:]:
            self._servers.append(self.ctl.call(self._listen(tmp_path / host / "ctl.sock")).result(10))  # type: ignore[arg-type]
        self.ovs: dict[str, DummyOVS] = {}
        self.ports: dict[str, int] = {}  # container -> port on its host's switch
        for host in HOSTS:
            workdir = tmp_path / host
            ovs = self.ovs[host] = DummyOVS(workdir).start()
            ovs.add_bridge("br0", state.hosts[host].datapath_id, f"unix:{workdir / 'ctl.sock'}")
            for i, c in enumerate(state.containers_on(host), 1):
                ovs.add_port("br0", c.port_name, i)
                self.ports[c.name] = i
            for peer in HOSTS:
                if peer != host:
                    ovs.add_port("br0", state.hosts[peer].tunnel_port, TUNNEL_NO[peer])
        self.source.publish(state)

    async def _listen(self, path: Path) -> asyncio.AbstractServer:
        assert self.ctl.controller is not None
        return await asyncio.start_unix_server(self.ctl.controller.handle_switch, str(path))

    def trace(self, host: str, flow: str) -> str:
        return self.ovs[host].trace("br0", flow)

    def stop(self) -> None:
        for server in self._servers:
            self.ctl.loop.call_soon_threadsafe(server.close)
        self.ctl.stop()
        for ovs in self.ovs.values():
            ovs.stop()


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    if shutil.which("ovs-vswitchd") is None:
        pytest.skip("ovs-vswitchd not installed")
    made = Cloud(tmp_path, build_state())
    try:
        for host in HOSTS:
            made.source.wait_realized(host)
        yield made
    finally:
        made.stop()


def tcp_in(in_port: str | int, dst_mac: str, port: int, src_mac: str = CFG.gateway_mac) -> str:
    return (f"in_port={in_port},dl_src={src_mac},dl_dst={dst_mac},tcp,nw_src={OUTSIDE},nw_dst={IP10},"
            f"tp_src=40000,tp_dst={port}")


def test_inbound_crosses_exactly_one_tunnel_to_the_owner(cloud: Cloud) -> None:
    for name, host, port in PLACES:
        mac = cloud.state.containers[name].mac
        # On the gateway host: rewritten there, then out by the tunnel to the owner's host (or its port on h1).
        first = cloud.trace("h1", tcp_in("LOCAL", CFG.virtual_mac, port))
        assert f"set(eth(dst={mac}))" in last_actions(first), first
        want = [str(cloud.ports[name])] if host == "h1" else [str(TUNNEL_NO[host])]
        assert of_outputs(first) == want, (name, first)
        if host != "h1":
            # On the owner's host, arriving from the tunnel that leads back to h1: to the container's port.
            second = cloud.trace(host, tcp_in(TUNNEL_NO["h1"], mac, port))
            assert of_outputs(second) == [str(cloud.ports[name])], (name, second)


def test_a_frame_from_a_tunnel_never_leaves_by_a_tunnel(cloud: Cloud) -> None:
    b, c = cloud.state.containers["b"], cloud.state.containers["c"]
    # Positive control: b's MAC from the tunnel is delivered on h2.
    assert of_outputs(cloud.trace("h2", tcp_in(TUNNEL_NO["h1"], b.mac, 80))) == [str(cloud.ports["b"])]
    # c lives on h3 and the gateway on h1: from a tunnel, h2 sends neither anywhere (split horizon).
    for dst in (c.mac, CFG.gateway_mac, CFG.virtual_mac):
        out = cloud.trace("h2", tcp_in(TUNNEL_NO["h1"], dst, 443))
        assert of_outputs(out) == [] and last_actions(out) == "Datapath actions: drop", (dst, out)
    # Not IPv4 (ARP) from a tunnel: dropped too, while the same ARP from a container is answered.
    arp = f"arp,dl_src={b.mac},dl_dst=ff:ff:ff:ff:ff:ff,arp_op=1,arp_spa={IP10},arp_tpa={CFG.gateway_ip},arp_sha={b.mac}"
    assert of_outputs(cloud.trace("h2", f"in_port={TUNNEL_NO['h1']},{arp}")) == []
    assert of_outputs(cloud.trace("h2", f"in_port={cloud.ports['b']},{arp}")) == ["IN_PORT"]


def test_compute_host_container_reaches_outside_through_the_gateway_host(cloud: Cloud) -> None:
    b = cloud.state.containers["b"]
    src_port = b.block.start + 5
    out_flow = (f"dl_src={b.mac},dl_dst={CFG.gateway_mac},tcp,nw_src={IP10},nw_dst={OUTSIDE},"
                f"tp_src={src_port},tp_dst=443")
    first = cloud.trace("h2", f"in_port={cloud.ports['b']},{out_flow}")
    assert of_outputs(first) == [str(TUNNEL_NO["h1"])], first
    second = cloud.trace("h1", f"in_port={TUNNEL_NO['h2']},{out_flow}")
    assert of_outputs(second) == ["LOCAL"], second
    # The reply comes back through h1's kernel (LOCAL), is rewritten by b's block there, and tunnelled to h2.
    reply = cloud.trace("h1", f"in_port=LOCAL,dl_src={CFG.gateway_mac},dl_dst={CFG.virtual_mac},tcp,"
                              f"nw_src={OUTSIDE},nw_dst={IP10},tp_src=443,tp_dst={src_port}")
    assert f"set(eth(dst={b.mac}))" in last_actions(reply) and of_outputs(reply) == [str(TUNNEL_NO["h2"])], reply


def test_same_host_traffic_never_leaves_the_host(cloud: Cloud) -> None:
    """A second container on h2 talks to b through the shared IP: the switch delivers it locally."""
    state = cloud.state
    d = new_container(state, CFG, name="d", host="h2", ips=[IPv4Address("203.0.113.12")])
    state = replace(state, containers={**state.containers, "d": d})
    cloud.ovs["h2"].add_port("br0", d.port_name, 9)
    cloud.source.publish(state)
    for host in HOSTS:
        cloud.source.wait_realized(host)
    flow = (f"in_port=9,dl_src={d.mac},dl_dst={CFG.gateway_mac},tcp,nw_src=203.0.113.12,nw_dst={IP10},"
            f"tp_src={d.block.start},tp_dst=80")
    assert of_outputs(cloud.trace("h2", flow)) == [str(cloud.ports["b"])]
    # ... and to c (on h3) it goes to exactly h3's tunnel.
    assert of_outputs(cloud.trace("h2", flow.replace("tp_dst=80", "tp_dst=443"))) == [str(TUNNEL_NO["h3"])]


def test_a_config_change_reprograms_every_switch(cloud: Cloud) -> None:
    new_mac = "0a:00:00:00:00:77"
    b = cloud.state.containers["b"]
    probe = f"in_port={cloud.ports['b']},dl_src={b.mac},dl_dst={new_mac},tcp,nw_src={IP10},nw_dst={OUTSIDE}," \
            f"tp_src={b.block.start},tp_dst=443"
    assert of_outputs(cloud.trace("h2", probe)) == []  # the control: not the gateway MAC yet
    generation = cloud.source.publish(replace(cloud.state, config=replace(CFG, gateway_mac=new_mac)))
    for host in HOSTS:
        cloud.source.wait_realized(host, generation)
    assert of_outputs(cloud.trace("h2", probe)) == [str(TUNNEL_NO["h1"])]
    old = probe.replace(f"dl_dst={new_mac}", f"dl_dst={CFG.gateway_mac}")
    assert of_outputs(cloud.trace("h2", old)) == []


def _tx(cloud: Cloud, host: str, port_name: str, tmp_name: str) -> Path:
    path = cloud.ovs[host].dir / f"{tmp_name}.pcap"
    cloud.ovs[host].vsctl("set", "interface", port_name, f"options:tx_pcap={path}")
    return path


def _frames(path: Path) -> list[bytes]:
    if not path.exists() or path.stat().st_size < 24:
        return []
    with path.open("rb") as f:
        return [bytes(buf) for _ts, buf in pcaplib.Reader(f)]


def _wait_frame(path: Path, ok: Callable[[bytes], bool], timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for got in _frames(path):
            if ok(got):
                return got
        time.sleep(0.02)
    raise AssertionError(f"nothing matching left by {path.name}: {[f.hex() for f in _frames(path)]}")


def test_echo_and_icmp_errors_for_a_compute_host_container_go_back_through_its_tunnel(cloud: Cloud) -> None:
    """On the gateway host: a compute container's echo request from the tunnel is committed to conntrack,
    so the reply from outside goes back into that tunnel with the container's MAC; an ICMP error quoting
    its mapped port goes through the controller to the same tunnel."""
    b = cloud.state.containers["b"]
    gw, vm = CFG.gateway_mac, CFG.virtual_mac
    to_h2 = _tx(cloud, "h1", cloud.state.hosts["h2"].tunnel_port, "to_h2")
    to_kernel = _tx(cloud, "h1", "br0", "local")
    h1 = cloud.ovs["h1"]
    from_h2 = cloud.state.hosts["h2"].tunnel_port
    h1.appctl("netdev-dummy/receive", from_h2, echo(b.mac, gw, str(IP10), OUTSIDE, 8, 77).hex())
    _wait_frame(to_kernel, lambda f: (i := icmp_of(f)) is not None and i.type == 8 and i.data.id == 77)
    h1.appctl("netdev-dummy/receive", "br0", echo(gw, vm, OUTSIDE, str(IP10), 0, 77).hex())
    reply = _wait_frame(to_h2, lambda f: (i := icmp_of(f)) is not None and i.type == 0)
    assert packet.Packet(reply).get_protocol(ethernet.ethernet).dst == b.mac and icmp_of(reply).data.id == 77
    # An unsolicited reply (another echo id) is not sent anywhere: the control for the one above.
    h1.appctl("netdev-dummy/receive", "br0", echo(gw, vm, OUTSIDE, str(IP10), 0, 78).hex())
    # Fragmentation needed, quoting b's mapped port 80: the controller sends it on to b, through the tunnel.
    err = error(gw, vm, OUTSIDE, str(IP10), quoted(str(IP10), OUTSIDE, Proto.TCP, 80, 40000))
    h1.appctl("netdev-dummy/receive", "br0", err.hex())
    got = _wait_frame(to_h2, lambda f: (i := icmp_of(f)) is not None and i.type == 3)
    assert packet.Packet(got).get_protocol(ethernet.ethernet).dst == b.mac
    assert [icmp_of(f).type for f in _frames(to_h2) if icmp_of(f) is not None] == [0, 3]


def test_a_stuck_switch_does_not_hold_back_the_others(cloud: Cloud) -> None:
    """Each switch is synced by its own task: while one switch's sync hangs, the others realise a new generation.
    The stuck one is the first the controller knows (a loop over the switches in turn would wait for it)."""
    controller = cloud.ctl.controller
    assert controller is not None
    stuck = next(iter(controller.switches.values()))
    stuck_host = next(h for h in HOSTS if cloud.state.hosts[h].datapath_id == stuck.datapath_id)
    release = threading.Event()
    real_apply = stuck.apply

    async def hang(*args: Any) -> Any:
        await asyncio.to_thread(release.wait, 20)
        return await real_apply(*args)

    stuck.apply = hang  # type: ignore[method-assign,assignment]
    try:
        d = new_container(cloud.state, CFG, name="d", host=stuck_host, ips=[IP10])
        state = replace(cloud.state, containers={**cloud.state.containers, "d": d})
        m = new_mapping(state, MappingKey(IP10, Proto.UDP, 53), "d")
        generation = cloud.source.publish(replace(state, mappings={**state.mappings, m.key: m}))
        for host in HOSTS:
            if host != stuck_host:
                cloud.source.wait_realized(host, generation)
        assert cloud.source.reports[stuck_host][0] < generation  # still syncing
    finally:
        release.set()
    # Positive control: once released, it realises the generation too (d, waiting for its port, is named).
    with cloud.source._cond:
        assert cloud.source._cond.wait_for(lambda: cloud.source.reports[stuck_host][0] >= generation, 10)


def _cookies(ovs: DummyOVS) -> set[int]:
    out = ovs.ofctl("dump-flows", "br0")
    return {int(part.split("=", 1)[1].rstrip(","), 16) for line in out.splitlines()
            for part in line.split() if part.startswith("cookie=")}


def test_port_changes_are_sent_as_deltas_and_leave_exactly_the_compiled_flows(cloud: Cloud) -> None:
    """A tunnel port going away and coming back under another number, and a container's port moving:
    each is a delta (no full sync), and the switch then holds exactly what a fresh compile gives."""
    from portmesh.controller.compiler import compile_switch

    controller = cloud.ctl.controller
    assert controller is not None
    h2 = cloud.ovs["h2"]
    switch = controller.switches[cloud.state.hosts["h2"].datapath_id]
    to_h3, b = cloud.state.hosts["h3"].tunnel_port, cloud.state.containers["b"]
    full_syncs = []
    real_sync = switch.sync

    async def counting(*args: Any) -> Any:
        full_syncs.append(1)
        return await real_sync(*args)

    switch.sync = counting  # type: ignore[method-assign,assignment]
    c_mac = cloud.state.containers["c"].mac
    for step in (lambda: h2.vsctl("del-port", "br0", to_h3), lambda: h2.add_port("br0", to_h3, 113),
                 lambda: h2.vsctl("del-port", "br0", b.port_name), lambda: h2.add_port("br0", b.port_name, 7)):
        version = switch.ports_version
        step()
        deadline = time.monotonic() + 10
        while switch.ports_version == version or switch.needs_sync(cloud.source.snapshot().generation):
            assert time.monotonic() < deadline, "the switch did not sync after a port change"
            time.sleep(0.02)
    assert full_syncs == []
    ports = dict(switch.ports)
    assert ports[to_h3] == 113 and ports[b.port_name] == 7
    assert _cookies(h2) == set(compile_switch(cloud.state, CFG, "h2", ports))
    # b, on its new port, reaches c (on h3) through the renumbered tunnel; from that tunnel, nothing goes back out.
    from_b = (f"in_port=7,dl_src={b.mac},dl_dst={CFG.gateway_mac},tcp,nw_src={IP10},nw_dst={IP10},"
              "tp_src=80,tp_dst=443")
    assert of_outputs(cloud.trace("h2", from_b)) == ["113"]
    assert of_outputs(cloud.trace("h2", tcp_in(113, c_mac, 443))) == []
    assert of_outputs(cloud.trace("h2", tcp_in(113, b.mac, 80))) == ["7"]
