"""ICMP through the real controller and a dummy-datapath OVS: frames injected, frames captured per port.

Echo replies find their sender through conntrack; ICMP errors find the owner of
the port they quote through the controller; a container's own errors pass only
when they quote one of its ports. Every port writes what it transmits to a pcap,
and the assertions are on those frames. Negatives are sent before a positive
control on the same path, so once the control has arrived the negative had its
chance (the switch and the controller keep order).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import os_ken.base.app_manager  # noqa: F401  (os-ken import order)
import pytest
from os_ken.lib import pcaplib
from os_ken.lib.packet import ethernet, icmp, ipv4, packet, tcp, udp

from portmesh.controller.pipeline import Meter
from portmesh.lab.dummy_ovs import DummyOVS
from portmesh.model.config import DEFAULT_CONFIG as CFG
from portmesh.model.entities import Container, DesiredState, Host, MappingKey, Proto
from portmesh.model.validation import new_container, new_mapping
from tests.switch.conftest import ControllerThread, MemoryState

IP10 = "203.0.113.10"
OUTSIDE = "198.51.100.2"
ROUTER = "198.51.100.1"
GW, VM = CFG.gateway_mac, CFG.virtual_mac


class State(MemoryState):
    """MemoryState that takes whatever the controller reports (the reporting signature is not ours)."""

    def report_switch(self, host: str, generation: int, connected: bool, *_more: Any) -> None:
        super().report_switch(host, generation, connected)


def build_state() -> DesiredState:
    """web1 (80/tcp) and web2 (8080/tcp) share 203.0.113.10."""
    state = DesiredState(hosts={"h1": Host("h1", datapath_id=1)})
    for name, port in (("web1", 80), ("web2", 8080)):
        c = new_container(state, CFG, name=name, host="h1", ips=[IPv4Address(IP10)])
        state = replace(state, containers={**state.containers, name: c})
        m = new_mapping(state, MappingKey(IPv4Address(IP10), Proto.TCP, port), name)
        state = replace(state, mappings={**state.mappings, m.key: m})
    return state


class Rig:
    """The switch, the controller and a pcap per port."""

    def __init__(self, ovs: DummyOVS, tmp: Path, state: DesiredState) -> None:
        self.ovs, self.tmp, self.state = ovs, tmp, state
        self.source = State(state)
        self.ctl = ControllerThread(self.source, tmp / "ctl.sock").start()
        ovs.add_bridge("br0", 1, f"unix:{tmp / 'ctl.sock'}")
        self.ports: dict[str, int] = {}
        for i, c in enumerate(sorted(state.containers.values(), key=lambda c: c.name), start=1):
            ovs.add_port("br0", c.port_name, i)
            ovs.vsctl("set", "interface", c.port_name, f"options:tx_pcap={tmp / c.name}.pcap")
            self.ports[c.name] = i
        ovs.vsctl("set", "interface", "br0", f"options:tx_pcap={tmp / 'local'}.pcap")
        self.source.publish(state)
        self.source.wait_realized("h1")

    def c(self, name: str) -> Container:
        return self.state.containers[name]

    def send(self, where: str, frame: bytes) -> None:
        """Inject ``frame`` as if it arrived on container ``where``'s port, or on LOCAL (``"local"``)."""
        self.ovs.appctl("netdev-dummy/receive", "br0" if where == "local" else self.c(where).port_name, frame.hex())

    def received(self, where: str) -> list[bytes]:
        path = self.tmp / f"{where}.pcap"
        if not path.exists() or path.stat().st_size < 24:
            return []
        with path.open("rb") as f:
            return [bytes(buf) for _ts, buf in pcaplib.Reader(f)]

    def wait_for(self, where: str, frame_ok: Any, timeout: float = 5.0) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for got in self.received(where):
                if frame_ok(got):
                    return got
            time.sleep(0.02)
        raise AssertionError(f"nothing matching arrived at {where}: {[f.hex() for f in self.received(where)]}")

    def stop(self) -> None:
        self.ctl.stop()


@pytest.fixture
def rig(dummy_ovs: DummyOVS, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(dummy_ovs, tmp_path, build_state())
    try:
        yield r
    finally:
        r.stop()


def ip_frame(src_mac: str, dst_mac: str, src: str, dst: str, payload: list[Any], proto: int, ttl: int = 64) -> bytes:
    p = packet.Packet()
    p.add_protocol(ethernet.ethernet(dst=dst_mac, src=src_mac))
    p.add_protocol(ipv4.ipv4(src=src, dst=dst, proto=proto, ttl=ttl))
    for layer in payload:
        p.add_protocol(layer)
    p.serialize()
    return bytes(p.data)


def echo(src_mac: str, dst_mac: str, src: str, dst: str, type_: int, id_: int) -> bytes:
    return ip_frame(src_mac, dst_mac, src, dst, [icmp.icmp(type_=type_, data=icmp.echo(id_=id_, seq=1, data=b"x" * 8))], 1)


def quoted(src: str, dst: str, proto: Proto, sport: int, dport: int) -> bytes:
    """The IP header and first 8 bytes of a TCP/UDP packet, as an ICMP error quotes them."""
    layer = tcp.tcp(src_port=sport, dst_port=dport, seq=1000) if proto is Proto.TCP else udp.udp(src_port=sport, dst_port=dport)
    frame = ip_frame("02:00:00:00:00:01", "02:00:00:00:00:02", src, dst, [layer, b"payload!"], 6 if proto is Proto.TCP else 17)
    return frame[14 : 14 + 20 + 8]


def error(src_mac: str, dst_mac: str, src: str, dst: str, quote: bytes, type_: int = 3, code: int = 4) -> bytes:
    """An ICMP error (default: fragmentation needed, MTU 1280) quoting ``quote``."""
    body = icmp.dest_unreach(data=quote, mtu=1280) if type_ == 3 else icmp.TimeExceeded(data=quote)
    return ip_frame(src_mac, dst_mac, src, dst, [icmp.icmp(type_=type_, code=code, data=body)], 1)


def icmp_of(frame: bytes) -> Any:
    return packet.Packet(frame).get_protocol(icmp.icmp)


def test_echo_replies_reach_each_sharer_by_conntrack(rig: Rig) -> None:
    w1, w2 = rig.c("web1"), rig.c("web2")
    rig.send("web1", echo(w1.mac, GW, IP10, OUTSIDE, 8, 101))
    rig.send("web2", echo(w2.mac, GW, IP10, OUTSIDE, 8, 202))
    rig.wait_for("local", lambda f: (i := icmp_of(f)) is not None and i.data.id == 202)  # both requests went out
    # The replies come back from outside, to the shared IP, in the other order.
    rig.send("local", echo(GW, VM, OUTSIDE, IP10, 0, 202))
    rig.send("local", echo(GW, VM, OUTSIDE, IP10, 0, 101))
    got1 = rig.wait_for("web1", lambda f: (i := icmp_of(f)) is not None and i.type == 0)
    got2 = rig.wait_for("web2", lambda f: (i := icmp_of(f)) is not None and i.type == 0)
    assert icmp_of(got1).data.id == 101 and packet.Packet(got1).get_protocol(ethernet.ethernet).dst == w1.mac
    assert icmp_of(got2).data.id == 202 and packet.Packet(got2).get_protocol(ethernet.ethernet).dst == w2.mac
    assert [icmp_of(f).data.id for f in rig.received("web1")] == [101]
    assert [icmp_of(f).data.id for f in rig.received("web2")] == [202]


def test_unsolicited_echo_reply_reaches_nobody(rig: Rig) -> None:
    w1 = rig.c("web1")
    rig.send("local", echo(GW, VM, OUTSIDE, IP10, 0, 303))  # nobody asked
    rig.send("web1", echo(w1.mac, GW, IP10, OUTSIDE, 8, 304))
    rig.send("local", echo(GW, VM, OUTSIDE, IP10, 0, 304))  # the control
    rig.wait_for("web1", lambda f: icmp_of(f) is not None and icmp_of(f).type == 0)
    assert [icmp_of(f).data.id for f in rig.received("web1")] == [304]
    assert rig.received("web2") == []


def test_error_about_an_echo_follows_conntrack(rig: Rig) -> None:
    w2 = rig.c("web2")
    request = echo(w2.mac, GW, IP10, OUTSIDE, 8, 77)
    rig.send("web2", request)
    rig.send("local", error(GW, VM, ROUTER, IP10, request[14 : 14 + 28], type_=11, code=0))
    got = rig.wait_for("web2", lambda f: icmp_of(f) is not None and icmp_of(f).type == 11)
    assert packet.Packet(got).get_protocol(ethernet.ethernet).dst == w2.mac
    assert rig.received("web1") == []


@pytest.mark.parametrize(
    ("proto", "owner", "port"), [(Proto.TCP, "web1", 80), (Proto.TCP, "web2", 8080), (Proto.UDP, "web2", None)]
)
def test_inbound_error_reaches_the_owner_of_the_quoted_port(rig: Rig, proto: Proto, owner: str, port: int | None) -> None:
    """Frag-needed quoting a service port (a mapping) or an ephemeral port (a block) reaches that container only."""
    c = rig.c(owner)
    sport = port if port is not None else c.block.start + 5
    frame = error(GW, VM, ROUTER, IP10, quoted(IP10, OUTSIDE, proto, sport, 443))
    rig.send("local", frame)
    got = rig.wait_for(owner, lambda f: icmp_of(f) is not None and icmp_of(f).type == 3)
    assert got[:6] == bytes.fromhex(c.mac.replace(":", "")) and got[6:] == frame[6:], "only eth_dst may change"
    other = "web2" if owner == "web1" else "web1"
    assert rig.received(other) == []


def test_inbound_error_nobody_owns_is_dropped(rig: Rig) -> None:
    unowned = 9999  # neither mapped nor in a block
    assert all(unowned not in c.block for c in rig.state.containers.values())
    rig.send("local", error(GW, VM, ROUTER, IP10, quoted(IP10, OUTSIDE, Proto.TCP, unowned, 443)))
    # A quote of another address than the one the error is sent to: not about the addressee's packet.
    rig.send("local", error(GW, VM, ROUTER, IP10, quoted("203.0.113.99", OUTSIDE, Proto.TCP, 80, 443)))
    rig.send("local", error(GW, VM, ROUTER, IP10, quoted(IP10, OUTSIDE, Proto.TCP, 80, 443)))  # the control
    rig.wait_for("web1", lambda f: icmp_of(f) is not None)
    assert len(rig.received("web1")) == 1 and rig.received("web2") == []
    metrics = rig.ctl.controller.metrics if rig.ctl.controller else None
    assert metrics is not None
    assert metrics.icmp_errors.labels("h1", "in", "unowned")._value.get() == 2
    assert metrics.icmp_errors.labels("h1", "in", "delivered")._value.get() == 1


def test_container_error_passes_only_about_its_own_port(rig: Rig) -> None:
    w1 = rig.c("web1")
    # web1 says "port unreachable" about a packet to web2's service port: refused.
    foreign = error(w1.mac, GW, IP10, OUTSIDE, quoted(OUTSIDE, IP10, Proto.TCP, 40000, 8080), code=3)
    # ... and about a packet to its own service port: passed, out through the gateway (LOCAL).
    own = error(w1.mac, GW, IP10, OUTSIDE, quoted(OUTSIDE, IP10, Proto.TCP, 40001, 80), code=3)
    rig.send("web1", foreign)
    rig.send("web1", own)
    got = rig.wait_for("local", lambda f: icmp_of(f) is not None and icmp_of(f).type == 3)
    assert got == own
    assert [f for f in rig.received("local") if icmp_of(f) is not None] == [own]
    metrics = rig.ctl.controller.metrics if rig.ctl.controller else None
    assert metrics is not None
    assert metrics.icmp_errors.labels("h1", "out", "foreign")._value.get() == 1
    assert metrics.icmp_errors.labels("h1", "out", "passed")._value.get() == 1


def test_container_error_to_a_sharer_reaches_it_through_the_controller_twice(rig: Rig) -> None:
    """web2 answers a datagram web1 sent it from web1's ephemeral port: checked as web2's (outbound), then
    found to concern web1 (inbound, the destination is a public IP) and delivered there."""
    w1, w2 = rig.c("web1"), rig.c("web2")
    sport, dport = w1.block.start + 1, w2.block.start + 2
    frame = error(w2.mac, GW, IP10, IP10, quoted(IP10, IP10, Proto.UDP, sport, dport), code=3)
    rig.send("web2", frame)
    got = rig.wait_for("web1", lambda f: icmp_of(f) is not None)
    assert got[6:] == frame[6:]
    assert rig.received("web2") == [] and rig.received("local") == []


def meter_counts(stats: str) -> tuple[int, int]:
    """(packets in, packets the drop band dropped) from ``ovs-ofctl meter-stats`` of one meter."""
    fields = dict(word.split(":", 1) for word in stats.split() if ":" in word and not word.endswith(":"))
    band = stats.split("bands:", 1)[1]
    dropped = int(band.split("packet_count:", 1)[1].split()[0])
    return int(fields["packet_in_count"]), dropped


def test_errors_to_the_controller_are_metered(rig: Rig) -> None:
    """600 errors at once: the meter passes about its burst, the controller sees and delivers just those."""
    frame = error(GW, VM, ROUTER, IP10, quoted(IP10, OUTSIDE, Proto.TCP, 80, 443))
    count = 600
    started = time.monotonic()
    for _ in range(0, count, 50):  # batched: one appctl call per frame would let the meter refill
        rig.ovs.appctl("netdev-dummy/receive", "br0", *([frame.hex()] * 50))
    # A dummy port queues at most 100 received frames, so some may be lost before the pipeline: count
    # what reached the meter. Its statistics lag the frames a little; read until they stop moving.
    seen, dropped, last = -1, -1, (-2, -2)
    deadline = time.monotonic() + 5
    while (seen, dropped) != last and time.monotonic() < deadline:
        last = (seen, dropped)
        time.sleep(0.1)
        seen, dropped = meter_counts(rig.ovs.ofctl("meter-stats", "br0", f"meter={Meter.ICMP_IN.meter_id}"))
    elapsed = time.monotonic() - started  # an upper bound on how long the meter had to refill
    spec = Meter.ICMP_IN.value
    assert seen > 2 * spec.burst and dropped > 0, (seen, dropped)
    passed = seen - dropped
    assert passed <= spec.burst + spec.rate_pps * (elapsed + 0.1), (passed, elapsed)
    metrics = rig.ctl.controller.metrics if rig.ctl.controller else None
    assert metrics is not None
    delivered = metrics.icmp_errors.labels("h1", "in", "delivered")
    deadline = time.monotonic() + 5
    while delivered._value.get() < passed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert delivered._value.get() == passed
    rig.wait_for("web1", lambda _f: len(rig.received("web1")) == passed)
    # The meter for containers' errors is separate: a flood from outside does not use it up.
    assert meter_counts(rig.ovs.ofctl("meter-stats", "br0", f"meter={Meter.ICMP_OUT.meter_id}"))[0] == 0


def test_a_restarted_controller_keeps_meters_and_flows(rig: Rig) -> None:
    """The meters exist already when a new controller meets the switch: modified, not re-added, no flow-mod."""
    installed = set(rig.ovs.dump_flows("br0"))
    rig.ctl.stop()
    rig.ctl = ControllerThread(rig.source, rig.tmp / "ctl.sock").start()
    generation = rig.source.publish(rig.state)  # same state, new generation: realised once the new one synced
    rig.source.wait_realized("h1", generation, timeout=20)
    controller = rig.ctl.controller
    assert controller is not None and controller.flow_mods == 0
    assert set(rig.ovs.dump_flows("br0")) == installed
    config = rig.ovs.ofctl("dump-meters", "br0")
    for meter in Meter:
        expected = f"meter={meter.meter_id} pktps burst bands=\ntype=drop rate={meter.value.rate_pps} "
        assert expected + f"burst_size={meter.value.burst}" in config, config
    # And the path through the controller works with the new one.
    rig.send("local", error(GW, VM, ROUTER, IP10, quoted(IP10, OUTSIDE, Proto.TCP, 80, 443)))
    rig.wait_for("web1", lambda f: icmp_of(f) is not None)


def test_limit_same_echo_id_to_the_same_destination_goes_to_the_later_sharer(rig: Rig) -> None:
    """The stated limit: one conntrack entry per (IP, destination, echo id), labelled by its latest sender."""
    w1, w2 = rig.c("web1"), rig.c("web2")
    rig.send("web1", echo(w1.mac, GW, IP10, OUTSIDE, 8, 5))
    rig.send("web2", echo(w2.mac, GW, IP10, OUTSIDE, 8, 5))
    rig.send("local", echo(GW, VM, OUTSIDE, IP10, 0, 5))
    rig.send("local", echo(GW, VM, OUTSIDE, IP10, 0, 5))
    rig.wait_for("web2", lambda _f: len(rig.received("web2")) == 2)
    assert rig.received("web1") == []
