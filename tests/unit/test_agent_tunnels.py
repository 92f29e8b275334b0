"""The agent's wiring of the mesh (service.py), with the kernel and OVS stood in for: which tunnels it asks
for, what reaches br0, what the firewall is told, and that the store hears about tunnels only on a change."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any, cast

import pytest

from portmesh.agent import plumbing, tunnels
from portmesh.agent.bridge import Bridge
from portmesh.agent.service import Agent, AgentConfig
from portmesh.model.entities import Host, HostRole
from portmesh.runtime.base import Runtime
from portmesh.store.client import Store
from tests.unit.fakes import FakeStore

H1 = Host("h1", 1, IPv4Address("198.19.0.11"))
H2 = Host("h2", 2, IPv4Address("198.19.0.12"), HostRole.COMPUTE)
H3 = Host("h3", 3, IPv4Address("198.19.0.13"), HostRole.COMPUTE)


class FakeBridge:
    def __init__(self) -> None:
        self.port_set: set[str] = set()
        self.reattached: list[str] = []

    def ensure(self, spec: object) -> bool:
        return False

    def ports(self) -> set[str]:
        return set(self.port_set)

    def has_port(self, port: str) -> bool:
        return port in self.port_set

    def ensure_ports(self, ports: list[str]) -> list[str]:
        added = [p for p in ports if p not in self.port_set]
        self.port_set.update(ports)
        return added

    def reattach_ports(self, ports: list[str]) -> list[str]:
        self.reattached += ports
        self.port_set.update(ports)
        return []

    def remove_port(self, port: str) -> bool:
        present = port in self.port_set
        self.port_set.discard(port)
        return present


class NoRuntime:
    keeps_netns_when_stopped = True

    def known(self) -> list[str]:
        return []


@dataclass
class Kernel:
    """What the agent asked of the host: realise() plans, firewall calls, devices it holds."""

    realised: list[set[str]] = field(default_factory=list)
    firewalls: list[tuple[frozenset[IPv4Address], bool]] = field(default_factory=list)  # peer IPs, compute
    devices: dict[str, tunnels.TunnelSpec] = field(default_factory=dict)
    me: str = ""  # the host the agent under test runs for


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Kernel:
    k = Kernel()

    def realise(specs: dict[str, tunnels.TunnelSpec], known: Any = ()) -> tunnels.Realised:
        k.realised.append(set(specs))
        made = [n for n in specs if k.devices.get(n) != specs[n]]
        removed = [n for n in k.devices if n not in specs]
        k.devices = dict(specs)
        return tunnels.Realised(made=made, removed=removed, present=set(specs))

    def observe(specs: dict[str, tunnels.TunnelSpec]) -> tuple[dict[str, tunnels.Device], tuple[int, int, str]]:
        devices = {n: tunnels.Device(n, 9, "vxlan", s.vni, s.local, s.remote, s.port, 3, 0, 1450, True)
                   for n, s in k.devices.items()}
        return devices, (3, 1500, "")

    def gateway(config: object, bridge: str = "br0", *, underlay_dev: str | None = None, peers: Any = (),
                compute: bool = False) -> None:
        pairs = set(peers)
        # Each peer's address goes with the VNI of its own tunnel with this host, and only that one.
        by_ip = {h.underlay_ip: h.name for h in (H1, H2, H3)}
        assert all(vni == tunnels.pair_vni(4242, k.me, by_ip[ip]) for ip, vni in pairs)
        k.firewalls.append((frozenset(ip for ip, _ in pairs), compute))

    monkeypatch.setattr(tunnels, "realise", realise)
    monkeypatch.setattr(tunnels, "observe", observe)
    monkeypatch.setattr(plumbing, "ensure_host_gateway", gateway)
    monkeypatch.setattr(plumbing, "recheck_isolation", lambda *a, **kw: None)
    monkeypatch.setattr(plumbing, "host_ports", lambda: set())
    monkeypatch.setattr(plumbing, "host_view", lambda: plumbing.NsView({}, set(), set(), set()))
    return k


def agent_for(host: str, store: FakeStore, bridge: FakeBridge, kernel: Kernel) -> Agent:
    kernel.me = host
    cfg = AgentConfig(host, "tcp:198.18.0.1:6653", "pm-t-", "ul0")
    return Agent(cfg, cast(Store, store), cast(Bridge, bridge), cast(Runtime, NoRuntime()))


def test_the_agent_builds_reports_and_follows_the_mesh(kernel: Kernel) -> None:
    store, bridge = FakeStore(), FakeBridge()
    for h in (H1, H2):
        store.add_host(h)
    agent = agent_for("h2", store, bridge, kernel)
    reports: list[dict[str, str]] = []
    real_report = store.report_tunnels

    def report(host: str, t: Any) -> None:
        reports.append(dict(t))
        real_report(host, t)

    store.report_tunnels = report  # type: ignore[method-assign,assignment]

    assert agent.converge(store.snapshot())
    assert bridge.port_set == {H1.tunnel_port}
    assert reports == [{"h1": "up"}] and store.host_status("h2").tunnels == (("h1", "up"),)
    assert kernel.firewalls[-1] == (frozenset({H1.underlay_ip}), True)  # h2 is a compute host
    # A pass with nothing new asks the kernel nothing and tells the store nothing.
    agent.converge(store.snapshot())
    assert len(kernel.realised) == 1 and len(reports) == 1

    store.add_host(H3)
    agent.converge(store.snapshot())
    assert kernel.realised[-1] == {H1.tunnel_port, H3.tunnel_port}
    assert bridge.port_set == {H1.tunnel_port, H3.tunnel_port}
    assert reports[-1] == {"h1": "up", "h3": "up"}
    assert kernel.firewalls[-1] == (frozenset({H1.underlay_ip, H3.underlay_ip}), True)

    store.remove_host("h3")
    agent.converge(store.snapshot())
    assert bridge.port_set == {H1.tunnel_port} and reports[-1] == {"h1": "up"}
    assert kernel.firewalls[-1] == (frozenset({H1.underlay_ip}), True)

    # This host leaves the cloud: its own tunnels go too.
    store.remove_host("h2")
    agent.converge(store.snapshot())
    assert kernel.realised[-1] == set() and bridge.port_set == set()


def test_a_tunnel_port_left_on_br0_without_its_host_is_removed_and_a_gateway_host_forwards(kernel: Kernel) -> None:
    store, bridge = FakeStore(), FakeBridge()
    for h in (H1, H2):
        store.add_host(h)
    bridge.port_set = {H3.tunnel_port, "extra0"}  # h3 left while this agent was down
    agent = agent_for("h1", store, bridge, kernel)
    agent.converge(store.snapshot())
    assert bridge.port_set == {H2.tunnel_port, "extra0"}
    assert kernel.firewalls[-1] == (frozenset({H2.underlay_ip}), False)


def test_without_underlay_dev_no_tunnels(kernel: Kernel) -> None:
    store, bridge = FakeStore(), FakeBridge()
    for h in (H1, H2):
        store.add_host(h)
    agent = Agent(AgentConfig("h1", "tcp:198.18.0.1:6653", ""), cast(Store, store), cast(Bridge, bridge),
                  cast(Runtime, NoRuntime()))
    agent.converge(store.snapshot())
    assert bridge.port_set == set() and kernel.firewalls[-1] == (frozenset(), False)
    assert store.host_status("h1").tunnels == ()


def test_a_failing_mesh_does_not_hold_back_the_host_and_is_retried(kernel: Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    store, bridge = FakeStore(), FakeBridge()
    for h in (H1, H2):
        store.add_host(h)
    agent = agent_for("h1", store, bridge, kernel)
    calls: list[int] = []

    def broken(specs: dict[str, tunnels.TunnelSpec], known: Any = ()) -> tunnels.Realised:
        calls.append(len(specs))
        raise OSError("netlink went away")

    monkeypatch.setattr(tunnels, "realise", broken)
    assert agent.converge(store.snapshot())  # the host's own work is done; its generation is reported
    assert store.host_status("h1").agent_generation == store.snapshot().generation
    agent.converge(store.snapshot())
    assert calls == [1]  # not on every pass...
    agent._next_full = 0.0
    agent.converge(store.snapshot())
    assert calls == [1, 1]  # ...on the next full one
