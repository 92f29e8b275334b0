"""portmesh/agent/tunnels.py: the mesh planner and the status rules (pure), and (as root, in a scratch
namespace) that realise() makes, keeps, remakes and removes kernel VXLAN devices as planned."""

from __future__ import annotations

import os
import subprocess
import threading
from dataclasses import replace
from ipaddress import IPv4Address

from portmesh.agent import isolation, tunnels
from portmesh.model.config import NetworkConfig
from portmesh.model.entities import DesiredState, Host, HostRole, tunnel_port_for
from tests.unit.test_isolation import in_scratch_netns, needs_nft

A = IPv4Address


def state(*hosts: Host, config: NetworkConfig | None = None) -> DesiredState:
    return DesiredState(hosts={h.name: h for h in hosts}, config=config or NetworkConfig())


H1 = Host("h1", 1, A("198.19.0.11"))
H2 = Host("h2", 2, A("198.19.0.12"), HostRole.COMPUTE)
H3 = Host("h3", 3, A("198.19.0.13"), HostRole.COMPUTE)
NO_UNDERLAY = Host("h4", 4, None)


def test_plan_one_device_per_peer_named_after_the_peer() -> None:
    cfg = NetworkConfig(vxlan_vni=77, vxlan_port=4790)
    specs = tunnels.plan(state(H1, H2, H3, NO_UNDERLAY, config=cfg), "h2", "ul0")
    assert sorted(specs) == sorted([tunnel_port_for("h1"), tunnel_port_for("h3")])
    s = specs[tunnel_port_for("h3")]
    assert (s.peer, s.local, s.remote, s.port, s.dev) == ("h3", A("198.19.0.12"), A("198.19.0.13"), 4790, "ul0")
    assert s.vni == tunnels.pair_vni(77, "h2", "h3")
    # Each side names the device after the other end: h3 reaches h2 through h2's tunnel port.
    assert tunnels.plan(state(H1, H2, H3), "h3", "ul0")[H2.tunnel_port].remote == H2.underlay_ip


def test_plan_is_empty_for_an_unknown_host_a_host_without_underlay_and_a_lone_host() -> None:
    assert tunnels.plan(state(H1, H2), "nope", "ul0") == {}
    assert tunnels.plan(state(H1, H2, NO_UNDERLAY), "h4", "ul0") == {}
    assert tunnels.plan(state(H1, NO_UNDERLAY), "h1", "ul0") == {}


def test_pair_vni_is_symmetric_distinct_per_host_and_offset_by_the_config() -> None:
    # The kernel refuses two devices with one VNI and one local address: each pair has its own.
    assert tunnels.pair_vni(4242, "h1", "h2") == tunnels.pair_vni(4242, "h2", "h1")
    vnis = {tunnels.pair_vni(4242, "h1", f"h{i}") for i in range(2, 60)}
    assert len(vnis) == 58 and all(0 < v < 1 << 24 for v in vnis)
    assert tunnels.pair_vni(4243, "h1", "h2") == (tunnels.pair_vni(4242, "h1", "h2") + 1) % (1 << 24) or 1
    both = tunnels.plan(state(H1, H2), "h1", "ul0")[H2.tunnel_port], tunnels.plan(state(H1, H2), "h2", "ul0")[H1.tunnel_port]
    assert both[0].vni == both[1].vni


def test_a_host_leaving_drops_its_tunnel_from_the_plan() -> None:
    before = tunnels.plan(state(H1, H2, H3), "h1", "ul0")
    after = tunnels.plan(state(H1, H2), "h1", "ul0")
    assert set(before) - set(after) == {H3.tunnel_port}


def _device(spec: tunnels.TunnelSpec, **changes: object) -> tunnels.Device:
    dev = tunnels.Device(spec.name, 7, "vxlan", spec.vni, spec.local, spec.remote, spec.port, 3, 0, 1450, True)
    return replace(dev, **changes)  # type: ignore[arg-type]


def test_differences_name_each_parameter_that_differs() -> None:
    spec = tunnels.plan(state(H1, H2), "h1", "ul0")[H2.tunnel_port]
    assert tunnels.differences(spec, _device(spec), 3, 1450) == []
    got = tunnels.differences(spec, _device(spec, remote=A("198.19.0.99"), vni=1, learning=1, link=9, mtu=1500), 3, 1450)
    assert [d.split()[0] for d in got] == ["vni", "remote", "dev", "learning", "mtu"]
    assert tunnels.differences(spec, _device(spec, kind="dummy"), 3, 1450) == ["a dummy device holds the name"]


def test_status_up_only_when_as_planned_up_and_on_the_bridge() -> None:
    specs = tunnels.plan(state(H1, H2, H3), "h1", "ul0")
    n2, n3 = H2.tunnel_port, H3.tunnel_port
    devices = {n2: _device(specs[n2]), n3: _device(specs[n3], up=False)}
    underlay = (3, 1500, "")
    assert tunnels.status(specs, devices, {n2, n3}, underlay) == {"h2": "up", "h3": f"down: device {n3} is down"}
    assert tunnels.status(specs, devices, set(), underlay)["h2"] == f"down: {n2} is not on br0"
    assert tunnels.status(specs, {}, {n2}, underlay)["h2"] == f"down: device {n2} is missing"
    assert tunnels.status(specs, devices, {n2}, (3, 1550, ""))["h2"].startswith("down: mtu 1450 (wanted 1500)")
    gone = tunnels.status(specs, devices, {n2, n3}, (0, 0, "underlay device ul0 does not exist"))
    assert gone == {"h2": "down: underlay device ul0 does not exist", "h3": "down: underlay device ul0 does not exist"}
    assert tunnels.status(specs, devices, {n2}, underlay, {n2: "OSError: boom"})["h2"] == "down: OSError: boom"


@needs_nft
def test_realise_makes_keeps_remakes_and_removes_devices() -> None:
    def work() -> dict[str, object]:
        ns_path = f"/proc/{os.getpid()}/task/{threading.get_native_id()}/ns/net"

        def ip(*args: str) -> str:
            return subprocess.run(["nsenter", f"--net={ns_path}", "ip", *args], check=True, capture_output=True,
                                  text=True).stdout

        ip("link", "add", "ul0", "type", "veth", "peer", "name", "ul0p")
        ip("link", "set", "ul0", "mtu", "1550")
        ip("addr", "add", "198.19.0.11/24", "dev", "ul0")
        ip("link", "set", "ul0", "up")
        full = tunnels.plan(state(H1, H2, H3), "h1", "ul0")
        out: dict[str, object] = {"first": tunnels.realise(full), "again": tunnels.realise(full)}
        out["devices"] = tunnels.observe(full)[0]
        out["chains"] = isolation.isolated_ports()
        out["details"] = ip("-d", "link", "show", H2.tunnel_port)
        changed = tunnels.plan(state(H1, H2, H3, config=NetworkConfig(vxlan_vni=99)), "h1", "ul0")
        out["remade"] = tunnels.realise(changed)
        out["shrunk"] = tunnels.realise(tunnels.plan(state(H1, H2), "h1", "ul0"))
        out["left"] = tunnels.observe(tunnels.plan(state(H1, H2, H3), "h1", "ul0"))[0].keys()
        out["chains_after"] = isolation.isolated_ports()
        out["no_underlay"] = tunnels.realise(tunnels.plan(state(H1, H2), "h1", "nosuch0"))
        clash = tunnels.plan(state(H1, H2, H3), "h1", "ul0")
        clash[H3.tunnel_port] = replace(clash[H3.tunnel_port], vni=clash[H2.tunnel_port].vni)
        out["clash"] = tunnels.realise(clash)
        return out

    got = in_scratch_netns(work)
    n2, n3 = H2.tunnel_port, H3.tunnel_port
    first, again = got["first"], got["again"]
    assert isinstance(first, tunnels.Realised) and isinstance(again, tunnels.Realised)
    assert sorted(first.made) == sorted([n2, n3]) and not first.errors
    assert again.made == [] and again.removed == []
    devices = got["devices"]
    assert isinstance(devices, dict)
    assert devices[n2].remote == A("198.19.0.12") and devices[n2].mtu == 1500 and devices[n2].up
    assert {n2, n3} <= set(got["chains"])  # type: ignore[call-overload]
    vni = tunnels.pair_vni(4242, "h1", "h2")
    assert f"vxlan id {vni} remote 198.19.0.12 local 198.19.0.11 dev ul0" in str(got["details"])
    assert "nolearning" in str(got["details"]) and "dstport 4789" in str(got["details"])
    remade = got["remade"]
    assert isinstance(remade, tunnels.Realised) and sorted(remade.made) == sorted([n2, n3])
    shrunk = got["shrunk"]
    assert isinstance(shrunk, tunnels.Realised) and shrunk.removed == [n3]
    assert set(got["left"]) == {n2} and n3 not in got["chains_after"]  # type: ignore[call-overload,operator]
    no_underlay = got["no_underlay"]
    assert isinstance(no_underlay, tunnels.Realised) and no_underlay.underlay_problem == "underlay device nosuch0 does not exist"
    clash = got["clash"]
    assert isinstance(clash, tunnels.Realised)
    # Two peers whose pairs share a VNI: the second by name is refused with the reason, not made.
    second = max(n2, n3)
    assert clash.errors[second].startswith(f"VNI {tunnels.pair_vni(4242, 'h1', 'h2')} is also the tunnel to")
