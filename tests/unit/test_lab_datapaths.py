"""`lab up --datapath`: which hosts run eBPF, and the errors a wrong value gets."""

from __future__ import annotations

import pytest

from portmesh.lab.datapaths import parse_datapaths

HOSTS = ("h1", "h2", "h3")


def test_one_word_applies_to_every_host() -> None:
    assert parse_datapaths("ovs", HOSTS) == {}
    assert parse_datapaths("ebpf", HOSTS) == {"h1": "ebpf", "h2": "ebpf", "h3": "ebpf"}


def test_per_host_pairs_leave_the_others_on_ovs() -> None:
    assert parse_datapaths("h2=ebpf, h3=ebpf", HOSTS) == {"h2": "ebpf", "h3": "ebpf"}
    assert parse_datapaths("h1=ovs,h2=ebpf", HOSTS) == {"h2": "ebpf"}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("xdp", "expected ovs or ebpf"),
        ("h4=ebpf", "no host 'h4'"),
        ("h2=xdp", "'xdp' is not one of"),
        ("h2=ebpf,h2=ovs", "named twice"),
    ],
)
def test_a_wrong_value_names_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_datapaths(text, HOSTS)


def test_switch_faults_name_an_ebpf_host_as_having_no_switch() -> None:
    from portmesh.lab import faults
    from portmesh.lab.network import Lab
    from portmesh.lab.state import LabState

    state = LabState("x", hosts=["h1", "h2"], datapaths={"h2": "ebpf"})
    faults._ovs_host(Lab("x"), state, "h1")  # an OVS host: fine
    with pytest.raises(faults.FaultError, match="h2 runs the ebpf datapath, it has no ovs-vswitchd"):
        faults._ovs_host(Lab("x"), state, "h2")
    with pytest.raises(faults.FaultError, match="no host 'h9'"):
        faults._ovs_host(Lab("x"), state, "h9")
