"""portmesh/agent/isolation.py: the rules it writes, and (as root, in a scratch namespace) that it converges."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import threading
from collections.abc import Callable
from ipaddress import IPv4Address as A
from ipaddress import IPv4Network
from typing import TypeVar

import pytest

from portmesh.agent import isolation

T = TypeVar("T")
CLONE_NEWNET = 0x40000000


def test_firewall_rules_fence_link_local_and_protected_networks() -> None:
    rules = isolation.firewall_rules("br0", [IPv4Network("198.18.0.0/15"), IPv4Network("10.9.0.0/16")])
    assert rules[0][:2] == ("input", 'iifname "br0" drop')
    chain, rule, _why = rules[1]
    assert chain == "forward"
    assert rule == 'iifname "br0" ip daddr { 10.9.0.0/16, 169.254.0.0/16, 198.18.0.0/15 } drop'


@pytest.mark.parametrize("bad", ["", "pm0123456789abc0", 'br0" accept', "a b", "x;y", "br0}"])
def test_names_that_could_parse_as_nft_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="port name"):
        isolation.isolate_port(bad)


def in_scratch_netns(work: Callable[[], T]) -> T:
    """Run ``work`` in a thread that entered a fresh, unnamed network namespace (nothing to clean up)."""
    out: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) != 0:  # this thread only; dies with it
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
            out.append(work())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return out[0]


needs_nft = pytest.mark.skipif(
    os.geteuid() != 0 or not ctypes.util.find_library("nftables"), reason="needs root and libnftables"
)


@needs_nft
def test_ports_and_firewall_converge_and_a_second_pass_writes_nothing() -> None:
    def work() -> dict[str, object]:
        tid = threading.get_native_id()
        ns_path = f"/proc/{os.getpid()}/task/{tid}/ns/net"

        def ip(*args: str) -> None:
            subprocess.run(["nsenter", f"--net={ns_path}", "ip", *args], check=True)

        ip("link", "add", "pm00000000000a", "type", "veth", "peer", "name", "x0")
        ip("link", "add", "pm00000000000b", "type", "veth", "peer", "name", "x1")
        protected = [IPv4Network("198.18.0.0/15")]
        return {
            "first": isolation.isolate_port("pm00000000000a"),
            "again": isolation.isolate_port("pm00000000000a"),
            "sync": isolation.sync_ports({"pm00000000000b"}),
            "sync_again": isolation.sync_ports({"pm00000000000b"}),
            "chains": isolation.isolated_ports(),
            "fw": isolation.ensure_host_firewall("br0", protected),
            "fw_again": isolation.ensure_host_firewall("br0", protected),
            "fw_changed": isolation.ensure_host_firewall("br0", [IPv4Network("198.18.0.0/16")]),
            "released": isolation.release_port("pm00000000000b"),
            "released_again": isolation.release_port("pm00000000000b"),
        }

    got = in_scratch_netns(work)
    assert got["first"] is True and got["again"] is False
    assert got["sync"] == ({"pm00000000000b"}, {"pm00000000000a"}) and got["sync_again"] == (set(), set())
    assert got["chains"] == {"pm00000000000b"}
    assert got["fw"] is True and got["fw_again"] is False and got["fw_changed"] is True
    assert got["released"] is True and got["released_again"] is False


def test_firewall_rules_accept_vxlan_from_peers_only_and_a_compute_host_forwards_nothing_from_br0() -> None:
    rules = isolation.firewall_rules("br0", [IPv4Network("198.18.0.0/15")], vxlan_port=4789, underlay_dev="ul0",
                                     compute=True)
    assert [(c, r) for c, r, _ in rules[2:]] == [
        ("input", 'iifname "ul0" udp dport 4789 ip saddr . @th,96,24 @tunnel_peers accept'),
        ("input", "udp dport 4789 drop"),
        ("forward", 'iifname "br0" drop'),
    ]
    assert len(isolation.firewall_rules("br0", [], vxlan_port=4789, underlay_dev="ul0")) == 4  # a gateway forwards
    # No underlay, no tunnels: VXLAN is only dropped.
    assert [r for _, r, _ in isolation.firewall_rules("br0", [], vxlan_port=4789)][2:] == ["udp dport 4789 drop"]
    with pytest.raises(ValueError, match="port name"):
        isolation.firewall_rules("br0", [], vxlan_port=4789, underlay_dev='ul0" accept')
    with pytest.raises(ValueError, match="vxlan_port"):
        isolation.firewall_rules("br0", [], vxlan_port=0)


@needs_nft
def test_peer_set_follows_the_peers_without_rewriting_the_rules() -> None:
    def work() -> dict[str, object]:
        def fw(*peers: str, compute: bool = False) -> bool:
            pairs = [(A(p), 1000 + int(p.rsplit(".", 1)[1])) for p in peers]  # each peer with its tunnel's VNI
            return isolation.ensure_host_firewall("br0", [], vxlan_port=4789, underlay_dev="ul0", peers=pairs,
                                                  compute=compute)

        def elements() -> list[list[object]]:
            sets = [o["set"] for o in isolation.nft().objects(f"list table inet {isolation.TABLE}") if "set" in o]
            return [e["concat"] for e in sets[0].get("elem", [])]

        def handles() -> list[int]:
            return [o["rule"]["handle"] for o in isolation.nft().objects(f"list table inet {isolation.TABLE}") if "rule" in o]

        out: dict[str, object] = {"first": fw("198.19.0.12"), "again": fw("198.19.0.12")}
        before = handles()
        out["joined"] = fw("198.19.0.12", "198.19.0.13")
        out["left"] = fw("198.19.0.13")
        out["same_rules"] = handles() == before
        out["text"] = elements()
        out["vni_changed"] = isolation.ensure_host_firewall("br0", [], vxlan_port=4789, underlay_dev="ul0",
                                                            peers=[(A("198.19.0.13"), 7)])
        out["vni_text"] = elements()
        out["compute"] = fw("198.19.0.13", compute=True)
        out["compute_again"] = fw("198.19.0.13", compute=True)
        out["text_after"] = elements()
        return out

    got = in_scratch_netns(work)
    assert got["first"] is True and got["again"] is False
    assert got["joined"] is True and got["left"] is True and got["same_rules"] is True
    assert got["text"] == [["198.19.0.13", 1013]]
    assert got["vni_changed"] is True and got["vni_text"] == [["198.19.0.13", 7]]
    assert got["compute"] is True and got["compute_again"] is False and got["text_after"] == [["198.19.0.13", 1013]]


@needs_nft
def test_sync_ports_spares_the_chains_it_is_told_to() -> None:
    def work() -> tuple[set[str], set[str], set[str]]:
        isolation.sync_ports({"pm00000000000a", "vx00000000000a"})
        added, deleted = isolation.sync_ports({"pm00000000000b"}, spare=lambda p: p.startswith("vx"))
        return added, deleted, isolation.isolated_ports()

    added, deleted, left = in_scratch_netns(work)
    assert added == {"pm00000000000b"} and deleted == {"pm00000000000a"}
    assert left == {"pm00000000000b", "vx00000000000a"}  # a tunnel's chain is tunnels.py's to delete
