"""Correctness at scale, at a size that runs in seconds: 5,000 mappings on a dummy-datapath switch.

The flow count is exact, a sample of lookups traced through the switch lands on the right
container, a restarted controller sends nothing, and one change sends only its own flows.
"""

from __future__ import annotations

import random
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path

from portmesh.controller.compiler import compile_switch
from portmesh.lab.dummy_ovs import DummyOVS
from portmesh.model.config import DEFAULT_CONFIG as CFG
from portmesh.model.entities import Container, DesiredState, Host, Mapping, MappingKey, PortBlock, Proto, mac_for
from tests.switch.conftest import ControllerThread, MemoryState

MAPPINGS = 5000
PER_CONTAINER = 125
BLOCKS_PER_IP = 32


def big_state() -> DesiredState:
    containers: dict[str, Container] = {}
    mappings: dict[MappingKey, Mapping] = {}
    for i in range(MAPPINGS // PER_CONTAINER):
        ip = IPv4Address(int(IPv4Address("203.0.113.1")) + i // BLOCKS_PER_IP)
        name = f"c{i}"
        block = PortBlock(32768 + (i % BLOCKS_PER_IP) * 1024, 1024)
        containers[name] = Container(name=name, host="h1", mac=mac_for(name), ips=(ip,), block=block)
        for j in range(PER_CONTAINER):
            key = MappingKey(ip, Proto.TCP if j % 2 else Proto.UDP, 1 + (i % BLOCKS_PER_IP) * PER_CONTAINER + j)
            mappings[key] = Mapping(key, name)
    return DesiredState(1, {"h1": Host("h1", 1)}, containers, mappings)


def test_5000_mappings_exact_traced_and_reconciled(dummy_ovs: DummyOVS, tmp_path: Path) -> None:
    state = big_state()
    source = MemoryState(state)
    sock = tmp_path / "ctl.sock"
    ctl = ControllerThread(source, sock).start()
    dummy_ovs.add_bridge("br0", 1, f"unix:{sock}")
    dummy_ovs.vsctl("set", "controller", "br0", "max_backoff=1000")
    ports = {}
    for i, c in enumerate(state.containers.values(), start=1):
        dummy_ovs.add_port("br0", c.port_name, i)
        ports[c.port_name] = i
    try:
        source.publish(state)
        source.wait_realized("h1", timeout=60)
        expected = compile_switch(state, CFG, "h1", ports)
        assert len(dummy_ovs.dump_flows("br0")) == len(expected)

        rng = random.Random(7)
        for mapping in rng.sample(sorted(state.mappings.values(), key=lambda m: m.key), 12):
            owner = state.containers[mapping.container]
            proto = mapping.proto.value
            trace = dummy_ovs.trace("br0", f"{proto},in_port=LOCAL,dl_dst={CFG.virtual_mac},nw_src=198.51.100.2,"
                                    f"nw_dst={mapping.public_ip},{proto}_src=40000,{proto}_dst={mapping.port}")
            assert f"set_field:{owner.mac}->eth_dst" in trace and f"output:{ports[owner.port_name]}" in trace, trace

        # One change among 5,000: exactly that mapping's flows are sent.
        assert ctl.controller is not None
        before = ctl.controller.flow_mods
        victim = next(iter(state.mappings))
        smaller = replace(state, mappings={k: m for k, m in state.mappings.items() if k != victim})
        generation = source.publish(smaller)
        source.wait_realized("h1", generation)
        assert ctl.controller.flow_mods - before == 2  # its rewrite flow and its source-port allowance
        assert len(dummy_ovs.dump_flows("br0")) == len(expected) - 2
    finally:
        ctl.stop()

    # A restarted controller facing the unchanged switch sends nothing.
    sock.unlink()
    source2 = MemoryState(smaller)
    ctl2 = ControllerThread(source2, sock).start()
    try:
        source2.wait_realized("h1", 0, timeout=30)
        assert ctl2.controller is not None and ctl2.controller.flow_mods == 0
    finally:
        ctl2.stop()
