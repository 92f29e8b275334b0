"""Tier 3 fixtures shared by the lab tests: which datapath the lab's hosts run.

A test module whose lab takes the ``datapath`` fixture runs once per datapath (the
issue 14 rule: the lab suite runs against OVS and against the eBPF datapath, not a
subset). ``PORTMESH_DATAPATHS=ovs`` (or ``ebpf``) narrows a local run to one.
"""

from __future__ import annotations

import os

import pytest

from portmesh.lab.datapaths import DATAPATHS


def _chosen() -> tuple[str, ...]:
    wanted = tuple(d.strip() for d in os.environ.get("PORTMESH_DATAPATHS", ",".join(DATAPATHS)).split(",") if d.strip())
    unknown = set(wanted) - set(DATAPATHS)
    if unknown:
        raise pytest.UsageError(f"PORTMESH_DATAPATHS: {', '.join(sorted(unknown))} is not one of {', '.join(DATAPATHS)}")
    return wanted


@pytest.fixture(scope="module", params=_chosen())
def datapath(request: pytest.FixtureRequest) -> str:
    """``ovs`` or ``ebpf``: what every host of the module's lab runs."""
    return str(request.param)


def lab_suffix(datapath: str) -> str:
    """A letter that keeps the two datapaths' labs of one module apart (names stay short)."""
    return "" if datapath == "ovs" else "e"
