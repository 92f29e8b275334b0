"""Tier 2: a mapping's firewall policy (table POLICY) in a dummy-datapath OVS, checked with ofproto/trace."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from portmesh.lab.dummy_ovs import DummyOVS
from tests.switch.test_balancing_trace import FW, backend_of, build_state, packet
from tests.switch.test_pipeline_trace import of_outputs, setup


def test_policy_deny_allow_and_default(dummy_ovs: DummyOVS, tmp_path: Path) -> None:
    """Deny inside allow wins, outside an allow list dropped without a reset, an unmapped port still
    refused by the controller, and a policy change opens the door (one bundle: no window)."""
    state = build_state()
    source, ctl, ports = setup(dummy_ovs, tmp_path, state)
    try:
        source.wait_realized("h1")
        assert backend_of(dummy_ovs, ports, "198.51.100.9", 40000, 22) == "ssh"  # allowed: rewritten
        denied = dummy_ovs.trace("br0", packet("198.51.100.7", 40000, 22))
        assert of_outputs(denied) == [] and "drop" in denied.splitlines()[-1], denied  # inside the allow, denied
        outside = dummy_ovs.trace("br0", packet("198.51.100.200", 40000, 22))
        assert of_outputs(outside) == [], outside  # not in the allow list: dropped, no reset
        assert "controller" not in outside.lower()
        # An unmapped port on the same IP still gets its reset (positive control of "refused, not silent").
        assert "CONTROLLER" in dummy_ovs.trace("br0", packet("198.51.100.200", 40000, 23)).upper()
        # Policy change: open it (no allow, no deny) -> the outsider passes.
        m = replace(state.mappings[FW], allow=(), deny=())
        gen = source.publish(replace(state, mappings={**state.mappings, FW: m}))
        source.wait_realized("h1", gen)
        assert backend_of(dummy_ovs, ports, "198.51.100.200", 40000, 22) == "ssh"
    finally:
        ctl.stop()
