"""test_multihost's per-host datapath checks, for clouds whose hosts run eBPF (all of them or some).

An OVS host runs its own ovs-vswitchd, holds an OpenFlow connection to the one controller and
has br0 with its datapath id; an eBPF host runs no OVS and no OpenFlow: its agent loads the
datapath into the host's own bpffs (maps pinned there, distinct kernel maps per host) and
reports the datapath connected itself. Both kinds hold an OVSDB connection to the store.
"""

from __future__ import annotations

from typing import Any, Protocol

from portmesh.lab import node, services
from portmesh.lab.network import bpf_dir, ovs_of, underlay_ip
from portmesh.lab.state import LabState
from portmesh.runtime import procs
from tests.lab.tools import t2_ebpf, t4_ebpf


class CloudLike(Protocol):
    state: LabState

    def sh(self, where: str, *argv: str, check: bool = True) -> str: ...

    def hosts(self) -> dict[str, dict[str, Any]]: ...


def assert_datapath_per_host(cloud: CloudLike, hosts: tuple[str, ...]) -> None:
    """Each host: its agent in its namespace, as its systemd unit runs it, and one datapath of its own."""
    state = cloud.state
    map_ids: set[int] = set()
    for i, host in enumerate(hosts, start=1):
        agent = state.process(f"agent:{host}")
        assert agent is not None and procs.alive(agent.ref) and agent.netns == state.ns(host)
        assert agent.argv[agent.argv.index("--store") + 1] == services.store_tcp_remote()
        assert agent.argv[agent.argv.index("--underlay-dev") + 1] == services.UNDERLAY_DEV
        if state.datapath(host) == "ebpf":
            assert state.process(f"ovs-vswitchd:{host}") is None, f"{host}: an eBPF host runs no OVS"
            assert "--controller" not in agent.argv and "--ovsdb" not in agent.argv, agent.argv
            assert agent.argv[agent.argv.index("--bpf-dir") + 1] == str(bpf_dir(state, host))
            t2_ebpf.wait_pinned(state, host)
            ids = t4_ebpf.map_ids(state, host)
            assert not set(ids.values()) & map_ids, f"{host} shares a map with another host"
            map_ids |= set(ids.values())
            programs = set(t2_ebpf.program_ports(state.ns(host)).values())
            assert "pm_from_tunnel" in programs, (host, programs)
            assert ("pm_from_uplink" in programs) == (host == "h1"), (host, programs)  # only the gateway has up0
        else:
            vswitchd = state.process(f"ovs-vswitchd:{host}")
            assert vswitchd is not None and procs.alive(vswitchd.ref) and vswitchd.netns == state.ns(host)
            assert agent.argv[agent.argv.index("--controller") + 1] == services.controller_target()
            ovs = ovs_of(state, host)
            out = node.run(["ovs-ofctl", "-O", "OpenFlow13", "show", "br0"], netns=ovs.netns, env=ovs.env()).stdout
            assert int(out.split("dpid:")[1].split()[0], 16) == i
    reported = cloud.hosts()
    assert {h: reported[h]["status"]["switch_connected"] for h in hosts} == dict.fromkeys(hosts, True)
    assert {h: reported[h].get("role") for h in hosts} == {h: "gateway" if h == "h1" else "compute" for h in hosts}
    assert {h: reported[h]["underlay_ip"] for h in hosts} == {h: underlay_ip(i) for i, h in enumerate(hosts, start=1)}
    # The store holds an OVSDB connection from every agent; the controller an OpenFlow one from OVS hosts only.
    ss = cloud.sh("mgmt", "ss", "-Htn", "state", "established").splitlines()
    for i, host in enumerate(hosts, start=1):
        peer = f"198.18.0.{10 + i}:"
        assert any(f"{services.CONTROLLER_IP}:{services.STORE_PORT}" in ln and peer in ln for ln in ss), (host, ss)
        openflow = any(f"{services.CONTROLLER_IP}:{services.CONTROLLER_PORT}" in ln and peer in ln for ln in ss)
        assert openflow == (state.datapath(host) == "ovs"), (host, ss)
