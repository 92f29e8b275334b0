"""The README's main job: `portmesh demo` brings up a cloud and every sample mapping answers from inet."""

from __future__ import annotations

import os
import shutil

import pytest

from portmesh.lab.demo import SAMPLES, run_demo
from portmesh.lab.network import Lab

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(shutil.which("ovs-vswitchd") is None, reason="openvswitch-switch is not installed"),
]


@pytest.mark.parametrize("datapath", ["ovs", "ebpf", "h2=ebpf"])
def test_demo_shows_every_mapping_answering_with_the_real_client_address(datapath: str) -> None:
    """On OVS hosts, on eBPF hosts, and in a mixed cloud (h2 on eBPF behind the OVS gateway h1)."""
    name = f"d{os.getpid() % 10000}{'oem'[['ovs', 'ebpf', 'h2=ebpf'].index(datapath)]}"
    lines: list[str] = []
    try:
        run_demo(name, say=lines.append, datapath=datapath)
    finally:
        assert Lab(name, say=lambda _m: None).down() == []
    text = "\n".join(lines)
    for cname, _host, ip, _args, ports in SAMPLES:
        for p in ports:
            assert f"name={cname} client=198.51.100.2:" in text, text
            assert f"local={ip}:{p['port']}" in text, text
    assert "refused: curl exit 7" in text, text
