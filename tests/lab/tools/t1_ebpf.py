"""The eBPF host's "flow table", decoded: what the end-to-end lab tests read where they read OVS flows.

On an OVS host the tests look for a flow naming a public IP, a port or a container's MAC;
on an eBPF host the same facts are entries of the pinned maps (``mappings``, ``public_ips``,
``ports``, ``macs``), decoded here with the ctypes mirrors of ``layout`` so a test compares
addresses and ports, not bpftool's byte dumps. ``spoof_drops`` reads the per-reason drop
counters the container port program adds to: the eBPF counterpart of the OVS port-security
drop flow's ``n_packets``.
"""

from __future__ import annotations

import json
import socket
import subprocess
from ipaddress import IPv4Address

from portmesh.agent.ebpf import layout, loader, sync
from portmesh.lab.network import bpf_dir
from portmesh.lab.state import LabState


def _ip(be: int) -> str:
    return str(IPv4Address(socket.ntohl(be)))


def mapping_keys(state: LabState, host: str) -> set[tuple[str, int, int]]:
    """(public IP, port, IP protocol) of every ``mappings`` entry on ``host``."""
    with loader.open_map(bpf_dir(state, host), "mappings") as m:
        keys = [layout.MappingKey.from_buffer_copy(raw) for raw in m]
    return {(_ip(k.ip), socket.ntohs(k.port), int(k.proto)) for k in keys}


def public_ips(state: LabState, host: str) -> set[str]:
    """The addresses in ``public_ips`` on ``host`` (those the program answers ping for / refuses on)."""
    with loader.open_map(bpf_dir(state, host), "public_ips") as m:
        return {_ip(int.from_bytes(raw, "little")) for raw in m}


def macs(state: LabState, host: str) -> set[str]:
    """Every MAC the maps hold for a destination or a port: ``ports`` values, ``macs`` keys, ``mappings``/``blocks`` values."""
    where = bpf_dir(state, host)
    found: set[str] = set()
    with loader.open_map(where, "ports") as m:
        found |= {layout.mac_text(layout.Port.from_buffer_copy(v).mac) for _, v in m.items()}
    with loader.open_map(where, "macs") as m:
        found |= {layout.mac_text(layout.MacKey.from_buffer_copy(k).mac) for k in m}
    for name in ("mappings", "blocks"):
        with loader.open_map(where, name) as m:
            found |= {layout.mac_text(layout.Dest.from_buffer_copy(v).mac) for _, v in m.items()}
    return found


def spoof_drops(state: LabState, host: str) -> dict[layout.DropReason, int]:
    """Packets dropped per reason on ``host`` (summed over CPUs)."""
    with loader.open_map(bpf_dir(state, host), "drops") as m:
        return {reason: packets for reason, (packets, _) in sync.read_drops({"drops": m}).items()}


def ingress_program(netns: str, dev: str) -> str:
    """The tc program's name at ``dev``'s ingress in ``netns`` ("" if none)."""
    done = subprocess.run(["ip", "netns", "exec", netns, "tc", "-j", "filter", "show", "dev", dev, "ingress"],
                          capture_output=True, text=True, timeout=30)
    if done.returncode or not done.stdout.strip():
        return ""
    for f in json.loads(done.stdout):
        name = (f.get("options") or {}).get("bpf_name", "")
        if name:
            return str(name).split(":")[0]
    return ""


def link_exists(netns: str, dev: str) -> bool:
    """Whether ``dev`` is a link in ``netns`` (a removed container's host-side port is gone with it)."""
    done = subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "show", "dev", dev],
                          capture_output=True, text=True, timeout=30)
    return done.returncode == 0
