"""Compiled flows installed by the real controller into a dummy-datapath OVS, checked with ofproto/trace."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path

from portmesh.lab.dummy_ovs import DummyOVS
from portmesh.model.config import DEFAULT_CONFIG as CFG
from portmesh.model.entities import DesiredState, Host, MappingKey, Proto
from portmesh.model.validation import new_container, new_mapping
from tests.switch.conftest import ControllerThread, MemoryState

IP10 = IPv4Address("203.0.113.10")
IP11 = IPv4Address("203.0.113.11")
OUTSIDE = "198.51.100.2"


def build_state() -> DesiredState:
    state = DesiredState(hosts={"h1": Host("h1", datapath_id=1)})
    for name, ip, port in (("web1", IP10, 80), ("web2", IP10, 8080), ("web3", IP11, 80)):
        c = new_container(state, CFG, name=name, host="h1", ips=[ip])
        state = replace(state, containers={**state.containers, name: c})
        m = new_mapping(state, MappingKey(ip, Proto.TCP, port), name)
        state = replace(state, mappings={**state.mappings, m.key: m})
    dns = new_mapping(state, MappingKey(IP11, Proto.UDP, 53), "web3")
    return replace(state, mappings={**state.mappings, dns.key: dns})


def setup(ovs: DummyOVS, tmp_path: Path, state: DesiredState) -> tuple[MemoryState, ControllerThread, dict[str, int]]:
    source = MemoryState(state)
    ctl = ControllerThread(source, tmp_path / "ctl.sock").start()
    ovs.add_bridge("br0", 1, f"unix:{tmp_path / 'ctl.sock'}")
    ports = {}
    for i, c in enumerate(sorted(state.containers.values(), key=lambda c: c.name), start=1):
        ovs.add_port("br0", c.port_name, i)
        ports[c.name] = i
    source.publish(state)
    return source, ctl, ports


def last_actions(trace: str) -> str:
    return [line for line in trace.splitlines() if line.startswith("Datapath actions:")][-1]


def of_outputs(trace: str) -> list[str]:
    """OpenFlow-level outputs in a trace: port numbers, IN_PORT or LOCAL."""
    outs = []
    for line in trace.splitlines():
        action = line.strip()
        if action.startswith("output:"):
            outs.append(action.split(":", 1)[1])
        elif action in ("IN_PORT", "LOCAL"):
            outs.append(action)
    return outs


def test_inbound_mapping_rewrites_only_the_mac(dummy_ovs: DummyOVS, tmp_path: Path) -> None:
    state = build_state()
    source, ctl, ports = setup(dummy_ovs, tmp_path, state)
    try:
        source.wait_realized("h1")
        gw = CFG.gateway_mac
        vm = CFG.virtual_mac
        for name, ip, port in (("web1", IP10, 80), ("web2", IP10, 8080), ("web3", IP11, 80)):
            out = dummy_ovs.trace("br0", f"in_port=LOCAL,dl_src={gw},dl_dst={vm},tcp,nw_src={OUTSIDE},"
                                  f"nw_dst={ip},tp_src=40000,tp_dst={port}")
            mac = state.containers[name].mac
            actions = last_actions(out)
            assert f"set(eth(dst={mac}))" in actions, out
            assert of_outputs(out) == [str(ports[name])], out
            assert "ipv4(" not in actions and "tcp(" not in actions, f"addresses must not be rewritten: {actions}"
        udp = last_actions(dummy_ovs.trace("br0", f"udp,in_port=LOCAL,dl_dst={vm},nw_src={OUTSIDE},nw_dst={IP11},"
                                           "udp_src=40000,udp_dst=53"))
        assert state.containers["web3"].mac in udp
    finally:
        ctl.stop()


def test_reply_to_container_block_and_port_security(dummy_ovs: DummyOVS, tmp_path: Path) -> None:
    state = build_state()
    source, ctl, ports = setup(dummy_ovs, tmp_path, state)
    try:
        source.wait_realized("h1")
        web1, web2 = state.containers["web1"], state.containers["web2"]
        for c in (web1, web2):
            reply = last_actions(dummy_ovs.trace(
                "br0", f"in_port=LOCAL,dl_dst={CFG.virtual_mac},tcp,nw_src={OUTSIDE},nw_dst={IP10},"
                f"tp_src=80,tp_dst={c.block.start + 7}"))
            assert f"set(eth(dst={c.mac}))" in reply, reply
        # web1 sending from web2's block: dropped.
        spoof = last_actions(dummy_ovs.trace(
            "br0", f"in_port={ports['web1']},dl_src={web1.mac},dl_dst={CFG.gateway_mac},tcp,nw_src={IP10},"
            f"nw_dst={OUTSIDE},tp_src={web2.block.start + 1},tp_dst=80"))
        assert spoof.endswith("drop"), spoof
        # web1 sending with web2's MAC, or an IP it does not hold: dropped.
        for bad in (f"dl_src={web2.mac},nw_src={IP10}", f"dl_src={web1.mac},nw_src={IP11}"):
            out = last_actions(dummy_ovs.trace(
                "br0", f"tcp,in_port={ports['web1']},{bad},dl_dst={CFG.gateway_mac},nw_dst={OUTSIDE},"
                f"tp_src={web1.block.start},tp_dst=80"))
            assert out.endswith("drop"), out
        # web1 from its own block to the outside: to the host (LOCAL).
        ok = last_actions(dummy_ovs.trace(
            "br0", f"in_port={ports['web1']},dl_src={web1.mac},dl_dst={CFG.gateway_mac},tcp,nw_src={IP10},"
            f"nw_dst={OUTSIDE},tp_src={web1.block.start + 3},tp_dst=80"))
        assert "drop" not in ok and ok != "Datapath actions: ", ok
        # Same-IP: web1 → 203.0.113.10:8080 reaches web2; web1 → its own :80 goes back out of its port.
        same = dummy_ovs.trace(
            "br0", f"in_port={ports['web1']},dl_src={web1.mac},dl_dst={CFG.gateway_mac},tcp,nw_src={IP10},"
            f"nw_dst={IP10},tp_src={web1.block.start},tp_dst=8080")
        assert f"set(eth(dst={web2.mac}))" in last_actions(same) and of_outputs(same) == [str(ports["web2"])], same
        own = dummy_ovs.trace(
            "br0", f"in_port={ports['web1']},dl_src={web1.mac},dl_dst={CFG.gateway_mac},tcp,nw_src={IP10},"
            f"nw_dst={IP10},tp_src={web1.block.start},tp_dst=80")
        assert of_outputs(own) == ["IN_PORT"], own
    finally:
        ctl.stop()


def test_arp_answered_by_switch_and_unmapped_punted(dummy_ovs: DummyOVS, tmp_path: Path) -> None:
    state = build_state()
    source, ctl, _ports = setup(dummy_ovs, tmp_path, state)
    try:
        source.wait_realized("h1")
        arp = dummy_ovs.trace("br0", f"in_port=LOCAL,arp,dl_src={CFG.gateway_mac},dl_dst=ff:ff:ff:ff:ff:ff,"
                              f"arp_op=1,arp_spa=169.254.1.1,arp_tpa={IP10},arp_sha={CFG.gateway_mac}")
        assert of_outputs(arp) == ["IN_PORT"], arp  # answered back out of the port it came from
        assert f"set_field:{CFG.virtual_mac}->arp_sha" in arp and "set_field:2->arp_op" in arp, arp
        unmapped = dummy_ovs.trace("br0", f"in_port=LOCAL,dl_dst={CFG.virtual_mac},tcp,nw_src={OUTSIDE},"
                                   f"nw_dst={IP10},tp_src=40000,tp_dst=9999")
        assert "controller" in unmapped.lower(), unmapped
    finally:
        ctl.stop()


def test_removal_leaves_nothing_stale_and_resync_sends_nothing(dummy_ovs: DummyOVS, tmp_path: Path) -> None:
    state = build_state()
    source, ctl, _ = setup(dummy_ovs, tmp_path, state)
    try:
        source.wait_realized("h1")
        before = len(dummy_ovs.dump_flows("br0"))
        web2 = state.containers["web2"]
        smaller = replace(
            state,
            containers={n: c for n, c in state.containers.items() if n != "web2"},
            mappings={k: m for k, m in state.mappings.items() if m.container != "web2"},
        )
        gen = source.publish(smaller)
        source.wait_realized("h1", gen)
        flows = dummy_ovs.dump_flows("br0")
        assert not any(web2.mac in f for f in flows), "web2's flows must be gone"
        assert not any("tp_dst=8080" in f for f in flows)
        assert len(flows) < before
        assert ctl.controller is not None
        mods = ctl.controller.flow_mods
        gen = source.publish(smaller)  # same content, new generation: nothing to send
        source.wait_realized("h1", gen)
        assert ctl.controller.flow_mods == mods
    finally:
        ctl.stop()
    # A restarted controller on the same socket: the switch reconnects, its flows are read and
    # diffed by cookie, and nothing is sent.
    (tmp_path / "ctl.sock").unlink()
    source2 = MemoryState(smaller)
    ctl2 = ControllerThread(source2, tmp_path / "ctl.sock").start()
    try:
        source2.wait_realized("h1", 0, timeout=20)
        assert ctl2.controller is not None
        assert ctl2.controller.flow_mods == 0
        assert len(dummy_ovs.dump_flows("br0")) == len(flows)
    finally:
        ctl2.stop()


def test_bulk_cookie_read_matches_os_ken_full_parse(dummy_ovs: DummyOVS, tmp_path: Path) -> None:
    """The controller reads installed flows by cookie with os-ken's struct layouts; check it against os-ken."""
    from portmesh.controller.encoding import DP, ofp, parser

    state = build_state()
    source, ctl, _ = setup(dummy_ovs, tmp_path, state)
    try:
        source.wait_realized("h1")
        assert ctl.controller is not None
        switch = next(iter(ctl.controller.switches.values()))

        async def both() -> tuple[set[int], set[int]]:
            fast = await switch.conn.flow_cookies()
            replies = await switch.conn.request(parser.OFPFlowStatsRequest(DP, table_id=ofp.OFPTT_ALL))
            return fast, {stat.cookie for r in replies for stat in r.body}

        fast, full = ctl.call(both()).result(10)  # type: ignore[misc]
        assert fast == full and len(full) == len(dummy_ovs.dump_flows("br0"))
    finally:
        ctl.stop()


def test_gateway_mac_leads_to_local_only_for_the_outside(dummy_ovs: DummyOVS, tmp_path: Path) -> None:
    """What a container may send to LOCAL: the outside yes; link-local and protected networks never."""
    state = build_state()
    source, ctl, ports = setup(dummy_ovs, tmp_path, state)
    try:
        source.wait_realized("h1")
        web1 = state.containers["web1"]
        head = f"in_port={ports['web1']},dl_src={web1.mac},dl_dst={CFG.gateway_mac}"
        outside = dummy_ovs.trace("br0", f"{head},udp,nw_src={IP10},nw_dst={OUTSIDE},udp_src={web1.block.start},udp_dst=53")
        assert of_outputs(outside) == ["LOCAL"], outside  # positive control: the gateway MAC leads to LOCAL
        for dst, port in (("169.254.1.1", 22), ("169.254.169.254", 80), ("169.254.9.9", 53),
                          ("198.18.0.1", 6653), ("198.18.0.11", 22), ("198.19.1.1", 4789)):
            out = dummy_ovs.trace("br0", f"{head},udp,nw_src={IP10},nw_dst={dst},udp_src={web1.block.start},udp_dst={port}")
            assert of_outputs(out) == [] and last_actions(out).endswith("drop"), (dst, out)
        # The switch itself answers ping for the gateway: back out of the port it came from, as an echo reply.
        ping = dummy_ovs.trace("br0", f"{head},icmp,nw_src={IP10},nw_dst=169.254.1.1,icmp_type=8,icmp_code=0")
        assert of_outputs(ping) == ["IN_PORT"] and "set_field:0->icmp_type" in ping, ping
    finally:
        ctl.stop()
