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
