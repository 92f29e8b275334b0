"""The gateway host's uplink as a switch port (issue 14 part 1), through the real controller and a dummy OVS.

The Host row names the uplink (``--uplink up0``, reported by the agent); the
controller compiles for that port: IPv4 to a pool enters the pipeline there,
everything else from it is dropped (the host kernel has its own copy). Refusals,
echo answers and ARP answers for public IPs go back out of the uplink. Checked
with ofproto/trace and with frames injected on ``up0`` and captured per port.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path

import os_ken.base.app_manager  # noqa: F401  (os-ken import order)
import pytest
from os_ken.lib.packet import ethernet, icmp, ipv4, packet, tcp

from portmesh.lab.dummy_ovs import DummyOVS
from portmesh.model.config import DEFAULT_CONFIG as CFG
from portmesh.model.entities import DesiredState, Host
from tests.switch.conftest import ControllerThread
from tests.switch.test_icmp_trace import IP10, OUTSIDE, ROUTER, Rig, State, echo, icmp_of, ip_frame
from tests.switch.test_icmp_trace import build_state as icmp_state
from tests.switch.test_pipeline_trace import last_actions, of_outputs

pytestmark = pytest.mark.switch

UPLINK, UPLINK_NO = "up0", 50
UPLINK_MAC = "02:00:5e:00:00:01"  # the host's own MAC on up0: the upstream routes the pools to it
CLIENT_MAC = "02:00:5e:00:00:02"  # the upstream router's (inet's) MAC


def build_state(uplink: str | None = UPLINK) -> DesiredState:
    """web1 (80/tcp) and web2 (8080/tcp) share 203.0.113.10 on h1, whose agent reported ``uplink``."""
    state = icmp_state()
    return replace(state, hosts={"h1": Host("h1", datapath_id=1, uplink=uplink)})


class UplinkRig(Rig):
    """:class:`Rig` with the uplink as port 50, its transmitted frames in ``up0.pcap``."""

    def __init__(self, ovs: DummyOVS, tmp: Path, state: DesiredState) -> None:
        # Rig's own set-up with the uplink port added before the state is published.
        self.ovs, self.tmp, self.state = ovs, tmp, state
        self.source = State(state)
        self.ctl = ControllerThread(self.source, tmp / "ctl.sock").start()
        ovs.add_bridge("br0", 1, f"unix:{tmp / 'ctl.sock'}")
        self.ports: dict[str, int] = {}
        for i, c in enumerate(sorted(state.containers.values(), key=lambda c: c.name), start=1):
            ovs.add_port("br0", c.port_name, i)
            ovs.vsctl("set", "interface", c.port_name, f"options:tx_pcap={tmp / c.name}.pcap")
            self.ports[c.name] = i
        ovs.add_port("br0", UPLINK, UPLINK_NO)
        for port, pcap in ((UPLINK, "up0"), ("br0", "local")):
            ovs.vsctl("set", "interface", port, f"options:tx_pcap={tmp / pcap}.pcap")
        self.source.publish(state)
        self.source.wait_realized("h1")

    def send(self, where: str, frame: bytes) -> None:
        if where == UPLINK:
            self.ovs.appctl("netdev-dummy/receive", UPLINK, frame.hex())
        else:
            super().send(where, frame)

    def trace(self, flow: str) -> str:
        return self.ovs.trace("br0", f"in_port={UPLINK_NO},dl_src={CLIENT_MAC},{flow}")


@pytest.fixture
def rig(dummy_ovs: DummyOVS, tmp_path: Path) -> Iterator[UplinkRig]:
    r = UplinkRig(dummy_ovs, tmp_path, build_state())
    try:
        yield r
    finally:
        r.stop()


def syn(dst: str, port: int, sport: int = 40000) -> bytes:
    return ip_frame(CLIENT_MAC, UPLINK_MAC, OUTSIDE, dst, [tcp.tcp(src_port=sport, dst_port=port, seq=7, bits=tcp.TCP_SYN)], 6)


def test_inbound_from_the_uplink_is_mapped_with_only_the_mac_rewritten(rig: UplinkRig) -> None:
    for name, port in (("web1", 80), ("web2", 8080)):
        out = rig.trace(f"dl_dst={UPLINK_MAC},tcp,nw_src={OUTSIDE},nw_dst={IP10},tp_src=40000,tp_dst={port}")
        actions = last_actions(out)
        assert f"set(eth(dst={rig.c(name).mac}))" in actions, out
        assert of_outputs(out) == [str(rig.ports[name])], out
        # The client's real address and the public destination arrive as sent; eth_src stays the upstream's.
        assert "ipv4(" not in actions and "tcp(" not in actions and "src=" not in actions, actions
    # A frame the upstream sends to the virtual MAC (it ARPed for the public IP itself) is mapped the same.
    out = rig.trace(f"dl_dst={CFG.virtual_mac},tcp,nw_src={OUTSIDE},nw_dst={IP10},tp_src=40000,tp_dst=80")
    assert of_outputs(out) == [str(rig.ports["web1"])], out
    # A container's reply block, from outside, reaches it too (replies to its own connections).
    block = rig.c("web2").block.start + 3
    out = rig.trace(f"dl_dst={UPLINK_MAC},tcp,nw_src={OUTSIDE},nw_dst={IP10},tp_src=443,tp_dst={block}")
    assert of_outputs(out) == [str(rig.ports["web2"])], out


def test_everything_else_from_the_uplink_is_the_kernels(rig: UplinkRig) -> None:
    # Positive control: pool traffic passes (above).
    assert of_outputs(rig.trace(f"dl_dst={UPLINK_MAC},tcp,nw_src={OUTSIDE},nw_dst={IP10},tp_dst=80")) != []
    for flow in (
        f"dl_dst={UPLINK_MAC},tcp,nw_src={OUTSIDE},nw_dst={ROUTER},tp_src=40000,tp_dst=22",  # the host's own address
        f"dl_dst={UPLINK_MAC},icmp,nw_src={OUTSIDE},nw_dst={ROUTER},icmp_type=8",
        f"dl_dst={UPLINK_MAC},tcp,nw_src={OUTSIDE},nw_dst={CFG.gateway_ip},tp_dst=80",  # link-local gateway
        f"dl_dst={UPLINK_MAC},tcp,nw_src={OUTSIDE},nw_dst=198.18.0.1,tp_dst=6640",  # the management network
        f"dl_dst=ff:ff:ff:ff:ff:ff,arp,arp_op=1,arp_spa={OUTSIDE},arp_tpa={ROUTER},arp_sha={CLIENT_MAC}",
        f"dl_dst={CFG.gateway_mac},tcp,nw_src={OUTSIDE},nw_dst=198.51.100.9,tp_dst=80",
    ):
        out = rig.trace(flow)
        assert of_outputs(out) == [] and last_actions(out) == "Datapath actions: drop", (flow, out)


def test_arp_for_a_public_ip_on_the_uplink_is_answered_with_the_virtual_mac(rig: UplinkRig) -> None:
    out = rig.trace(f"dl_dst=ff:ff:ff:ff:ff:ff,arp,arp_op=1,arp_spa={ROUTER},arp_tpa={IP10},arp_sha={CLIENT_MAC}")
    assert of_outputs(out) == ["IN_PORT"], out
    assert f"set_field:{CFG.virtual_mac}->arp_sha" in out, out


def test_an_unmapped_port_is_refused_back_out_of_the_uplink(rig: UplinkRig) -> None:
    rig.send(UPLINK, syn(IP10, 9999))
    reply = rig.wait_for(UPLINK, lambda f: packet.Packet(f).get_protocol(tcp.tcp) is not None)
    pkt = packet.Packet(reply)
    eth, ip, seg = pkt.get_protocol(ethernet.ethernet), pkt.get_protocol(ipv4.ipv4), pkt.get_protocol(tcp.tcp)
    assert eth.dst == CLIENT_MAC and (ip.src, ip.dst) == (IP10, OUTSIDE), pkt
    assert seg.bits & tcp.TCP_RST and (seg.src_port, seg.dst_port) == (9999, 40000) and seg.ack == 8, seg
    # Nothing of it reached a container or the host (LOCAL).
    assert rig.received("web1") == rig.received("web2") == rig.received("local") == []


def test_a_ping_to_a_public_ip_is_answered_out_of_the_uplink(rig: UplinkRig) -> None:
    rig.send(UPLINK, echo(CLIENT_MAC, UPLINK_MAC, OUTSIDE, IP10, icmp.ICMP_ECHO_REQUEST, 77))
    reply = rig.wait_for(UPLINK, lambda f: (m := icmp_of(f)) is not None and m.type == icmp.ICMP_ECHO_REPLY)
    pkt = packet.Packet(reply)
    assert pkt.get_protocol(ethernet.ethernet).dst == CLIENT_MAC
    assert (pkt.get_protocol(ipv4.ipv4).src, pkt.get_protocol(ipv4.ipv4).dst) == (IP10, OUTSIDE)
    assert icmp_of(reply).data.id == 77


def test_the_reply_to_a_containers_ping_comes_in_by_the_uplink_and_finds_it(rig: UplinkRig) -> None:
    web2 = rig.c("web2")
    # Out: web2 pings the outside; the switch commits it and hands it to the host (LOCAL), which routes it.
    rig.send("web2", echo(web2.mac, CFG.gateway_mac, IP10, OUTSIDE, icmp.ICMP_ECHO_REQUEST, 4242))
    rig.wait_for("local", lambda f: (m := icmp_of(f)) is not None and m.data.id == 4242)
    # Back: the reply arrives on the uplink and conntrack sends it to web2, and to nobody else.
    rig.send(UPLINK, echo(CLIENT_MAC, UPLINK_MAC, OUTSIDE, IP10, icmp.ICMP_ECHO_REPLY, 4242))
    rig.wait_for("web2", lambda f: (m := icmp_of(f)) is not None and m.type == icmp.ICMP_ECHO_REPLY)
    # An unsolicited reply (no request went out with this id) reaches nobody; web2's positive control above.
    rig.send(UPLINK, echo(CLIENT_MAC, UPLINK_MAC, OUTSIDE, IP10, icmp.ICMP_ECHO_REPLY, 999))
    rig.send(UPLINK, echo(CLIENT_MAC, UPLINK_MAC, OUTSIDE, IP10, icmp.ICMP_ECHO_REQUEST, 5))  # ordered after it
    rig.wait_for(UPLINK, lambda f: (m := icmp_of(f)) is not None and m.type == icmp.ICMP_ECHO_REPLY and m.data.id == 5)
    assert [icmp_of(f).data.id for f in rig.received("web2") if icmp_of(f) is not None] == [4242]
    assert rig.received("web1") == []


def test_the_uplink_is_compiled_only_once_the_host_reports_it(dummy_ovs: DummyOVS, tmp_path: Path) -> None:
    rig = UplinkRig(dummy_ovs, tmp_path, build_state(uplink=None))
    try:
        probe = f"dl_dst={UPLINK_MAC},tcp,nw_src={OUTSIDE},nw_dst={IP10},tp_src=40000,tp_dst=80"
        assert of_outputs(rig.trace(probe)) == []  # a port named up0 alone means nothing
        generation = rig.source.publish(build_state())
        rig.source.wait_realized("h1", generation)
        assert of_outputs(rig.trace(probe)) == [str(rig.ports["web1"])]
        generation = rig.source.publish(build_state(uplink=None))  # the agent gave it up
        rig.source.wait_realized("h1", generation)
        assert of_outputs(rig.trace(probe)) == []
    finally:
        rig.stop()


def test_pool_addresses_outside_the_mappings_still_reach_no_host_address(rig: UplinkRig) -> None:
    """A pool address nobody holds: no container gets it, and it is not handed to the host either."""
    spare = str(IPv4Address(IP10) + 50)
    out = rig.trace(f"dl_dst={UPLINK_MAC},tcp,nw_src={OUTSIDE},nw_dst={spare},tp_src=40000,tp_dst=80")
    assert "LOCAL" not in of_outputs(out) and of_outputs(out) == [], out
