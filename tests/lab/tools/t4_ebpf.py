"""What the lab tests read from an eBPF host's datapath where they read the OVS switch on an OVS host.

On an OVS host the tests compare flows (and their durations: a re-sent flow starts again
at 0) and OpenFlow port numbers; on an eBPF host the "flows" are the pinned maps. A map
that was re-created gets a new kernel id, and an entry that was rewritten shows in the
map's content, so "nothing was recreated" means: the same map ids and the same entries.
Counter maps (``layout.STAT_MAPS``) are left out of the content: traffic changes them.
Reads go through ``bpftool`` on the pinned paths (the lab's bpffs is mounted in the
root mount namespace, so no ``ip netns exec`` is needed).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from portmesh.agent.ebpf import layout, loader, sync
from portmesh.lab.network import bpf_dir
from portmesh.lab.state import LabState
from portmesh.model.entities import MappingKey
from tests.lab.tools.t1_ebpf import ingress_program as ingress_program  # one reader of the attached tc program for every lab tool

CONFIG_MAPS = tuple(name for name in layout.MAPS if name not in layout.STAT_MAPS)
ALL_MAPS = tuple(dict.fromkeys((*layout.MAPS, *layout.STAT_MAPS)))


def _bpftool(*argv: str) -> object:
    out = subprocess.run(["bpftool", "-j", *argv], capture_output=True, text=True, timeout=30, check=True).stdout
    return json.loads(out)


def map_path(state: LabState, host: str, name: str) -> Path:
    return bpf_dir(state, host) / "maps" / name


def map_ids(state: LabState, host: str) -> dict[str, int]:
    """Each pinned map's kernel id: a map re-created (not re-used) by a restarted agent gets a new one."""
    out = {}
    for name in ALL_MAPS:
        info = _bpftool("map", "show", "pinned", str(map_path(state, host, name)))
        assert isinstance(info, dict)
        out[name] = int(info["id"])
    return out


def map_contents(state: LabState, host: str) -> dict[str, list[str]]:
    """The entries of every non-counter map, each as a sorted list of JSON lines (comparable)."""
    out = {}
    for name in CONFIG_MAPS:
        entries = _bpftool("map", "dump", "pinned", str(map_path(state, host, name)))
        assert isinstance(entries, list)
        out[name] = sorted(json.dumps(e, sort_keys=True) for e in entries)
    return out


def drops(state: LabState, host: str) -> dict[layout.DropReason, int]:
    """Packets dropped per reason on ``host`` (summed over CPUs)."""
    with loader.open_map(bpf_dir(state, host), "drops") as m:
        return {reason: packets for reason, (packets, _) in sync.read_drops({"drops": m}).items()}


def mapping_packets(state: LabState, host: str, key: MappingKey) -> int:
    """Packets the program delivered through ``key`` on ``host``."""
    with loader.open_map(bpf_dir(state, host), "mapping_stats") as m:
        return sync.read_counters({"mapping_stats": m}, key)[0]


def entries(state: LabState, host: str) -> list[str]:
    """Every non-counter map entry as ``"<map>: <json>"``, sorted: the eBPF host's "flow table"."""
    return sorted(f"{name}: {entry}" for name, found in map_contents(state, host).items() for entry in found)


def mapping_entry_port(entry: str) -> int | None:
    """The port of a ``mappings`` entry from :func:`entries` (host order), None for any other map's entry."""
    name, _, text = entry.partition(": ")
    if name != "mappings":
        return None
    be = int(json.loads(text)["formatted"]["key"]["port"])  # the __be16 field read as a little-endian number
    return ((be & 0xFF) << 8) | (be >> 8)


def _macs_in(node: object) -> list[list[int]]:
    if isinstance(node, dict):
        return [m for k, v in node.items() for m in ([v] if k == "mac" and isinstance(v, list) else _macs_in(v))]
    if isinstance(node, list):
        return [m for v in node for m in _macs_in(v)]
    return []


def macs_of(entry: str) -> list[list[int]]:
    """The MACs an entry from :func:`entries` carries (a port's, a mapping's destination, a delivery's)."""
    return _macs_in(json.loads(entry.partition(": ")[2]).get("formatted", {}))
