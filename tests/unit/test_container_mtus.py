"""NetworkConfig.container_mtus: which MTU a container's eth0 and its routes to the pools get."""

from __future__ import annotations

from portmesh.model.config import NetworkConfig

CFG = NetworkConfig()  # container_mtu 1450: a 1500 underlay less VXLAN


def test_without_an_uplink_everything_keeps_the_tunnels_mtu() -> None:
    assert CFG.container_mtus(None) == (CFG.container_mtu, None)


def test_with_a_larger_uplink_eth0_takes_it_and_only_the_pools_keep_the_tunnels_mtu() -> None:
    assert CFG.container_mtus(1500) == (1500, CFG.container_mtu)
    assert CFG.container_mtus(9000) == (9000, CFG.container_mtu)


def test_an_uplink_no_larger_than_the_tunnels_changes_nothing() -> None:
    # A narrower uplink is the outside path's business (path MTU discovery), as on a compute host.
    assert CFG.container_mtus(1280) == (CFG.container_mtu, None)
    assert CFG.container_mtus(CFG.container_mtu) == (CFG.container_mtu, None)
