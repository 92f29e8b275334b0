"""The agent's ``--uplink`` (service.py), with OVS, nftables and the store stood in for: the order of the
steps taking the uplink over and giving it back, and that a failure is retried without holding back the host."""

from __future__ import annotations

from typing import cast

import pytest

from portmesh.agent import isolation, plumbing
from portmesh.agent.bridge import Bridge
from portmesh.agent.service import Agent, AgentConfig
from portmesh.model.config import NetworkConfig
from portmesh.runtime.base import Runtime
from portmesh.store.client import Store
from tests.unit.fakes import FakeStore
from tests.unit.test_agent_tunnels import H1, FakeBridge, Kernel, NoRuntime, kernel

__all__ = ["kernel"]  # the fixture, re-used


class Steps:
    """Records what was done, in order, across the bridge, the store and nftables."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, store: FakeStore, bridge: FakeBridge) -> None:
        self.log: list[str] = []
        self.fail_nft = False
        report, ensure, remove = store.report_uplink, bridge.ensure_ports, bridge.remove_port

        def report_uplink(host: str, uplink: str | None) -> None:
            if store.snapshot().hosts[host].uplink != uplink:
                self.log.append(f"report {uplink}")
            report(host, uplink)

        def ensure_ports(ports: list[str]) -> list[str]:
            added = ensure(ports)
            self.log += [f"port {p}" for p in added]
            return added

        def remove_port(port: str) -> bool:
            self.log.append(f"unport {port}")
            return remove(port)

        def ensure_uplink(uplink: str, config: NetworkConfig) -> bool:
            if self.fail_nft:
                raise plumbing.PlumbingError(f"uplink {uplink} does not exist on this host")
            self.log.append(f"drop {uplink} {','.join(str(p) for p in config.public_pools)}")
            return True

        def release_uplink() -> bool:
            self.log.append("undrop")
            return True

        store.report_uplink = report_uplink  # type: ignore[method-assign]
        bridge.ensure_ports = ensure_ports  # type: ignore[method-assign]
        bridge.remove_port = remove_port  # type: ignore[method-assign]
        monkeypatch.setattr(bridge, "ensure_port", lambda p: bool(ensure_ports([p])), raising=False)
        monkeypatch.setattr(plumbing, "ensure_uplink", ensure_uplink)
        monkeypatch.setattr(isolation, "release_uplink", release_uplink)
        monkeypatch.setattr(isolation, "needed", lambda: True)


def agent(store: FakeStore, bridge: FakeBridge, uplink: str | None) -> Agent:
    cfg = AgentConfig("h1", "tcp:198.18.0.1:6653", "pm-t-", None, uplink)
    return Agent(cfg, cast(Store, store), cast(Bridge, bridge), cast(Runtime, NoRuntime()))


def test_taking_over_is_port_then_report_then_drop_and_giving_back_the_reverse(
    kernel: Kernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, bridge = FakeStore(), FakeBridge()
    store.add_host(H1)
    steps = Steps(monkeypatch, store, bridge)
    a = agent(store, bridge, "up0")
    assert a.converge(store.snapshot())
    assert steps.log == ["port up0", "report up0", "drop up0 203.0.113.0/24"]
    assert store.snapshot().hosts["h1"].uplink == "up0"
    steps.log.clear()
    assert a.converge(store.snapshot())  # nothing new: nothing done but the (idempotent) drop check
    assert [s for s in steps.log if not s.startswith("drop")] == []
    # The agent restarted without --uplink: the kernel first, then the port, the report last.
    steps.log.clear()
    b = agent(store, bridge, None)
    assert b.converge(store.snapshot())
    assert steps.log == ["undrop", "unport up0", "report None"]
    steps.log.clear()
    assert b.converge(store.snapshot())
    assert steps.log == []  # and then leaves the host alone


def test_a_missing_uplink_is_logged_and_retried_without_holding_back_the_host(
    kernel: Kernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, bridge = FakeStore(), FakeBridge()
    store.add_host(H1)
    steps = Steps(monkeypatch, store, bridge)
    steps.fail_nft = True
    a = agent(store, bridge, "up0")
    assert a.converge(store.snapshot())  # the host's generation is still reported
    assert not any(s.startswith("drop") for s in steps.log)
    steps.fail_nft = False
    a._next_full = 0.0  # the next full pass retries
    assert a.converge(store.snapshot())
    assert steps.log[-1] == "drop up0 203.0.113.0/24"


def test_the_kernel_datapath_ignores_uplink(kernel: Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    store, bridge = FakeStore(), FakeBridge()
    store.add_host(H1)
    steps = Steps(monkeypatch, store, bridge)
    monkeypatch.setattr(isolation, "needed", lambda: False)
    assert agent(store, bridge, "up0").converge(store.snapshot())
    assert steps.log == [] and store.snapshot().hosts["h1"].uplink is None


