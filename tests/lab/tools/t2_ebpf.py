"""What test_mesh / test_multihost / test_lab_basics read on an eBPF host where they read br0 on an OVS host.

An eBPF host has no br0: a device is "on the datapath" when the agent attached one of the
datapath's tc programs to its ingress (``pm_from_container``, ``pm_from_uplink``,
``pm_from_tunnel``), and a tunnel device is isolated from the host kernel by that program
(it delivers or drops, never passes a frame up) in front of the
nft chain both kinds of host have. These helpers read that from ``tc`` in the host's namespace.
"""

from __future__ import annotations

import json
import subprocess
import time

from portmesh.lab.state import LabState
from tests.lab.tools import t4_ebpf

PROGRAMS = ("pm_from_container", "pm_from_uplink", "pm_from_tunnel")


def _tc(netns: str, *argv: str) -> str:
    done = subprocess.run(["ip", "netns", "exec", netns, "tc", "-j", *argv], capture_output=True, text=True, timeout=30)
    return done.stdout if done.returncode == 0 else ""


def ingress_filters(netns: str, dev: str) -> list[tuple[object, ...]]:
    """``dev``'s ingress filters as (pref, handle, program name, program id): a re-attached program changes them."""
    text = _tc(netns, "filter", "show", "dev", dev, "ingress")
    found = []
    for f in json.loads(text) if text.strip() else []:
        opts = f.get("options") or {}
        if opts.get("bpf_name"):
            found.append((f.get("pref"), opts.get("handle"), str(opts["bpf_name"]).split(":")[0], opts.get("prog", {}).get("id")))
    return sorted(found, key=repr)


def program_ports(netns: str) -> dict[str, str]:
    """Device -> the datapath program at its ingress, for every device of ``netns`` that has one."""
    links = json.loads(subprocess.run(["ip", "-n", netns, "-j", "link", "show"], capture_output=True, text=True,
                                      check=True, timeout=30).stdout)
    out = {}
    for name in (d["ifname"] for d in links):
        for _, _, prog, _ in ingress_filters(netns, name):
            if prog in PROGRAMS:
                out[name] = str(prog)
    return out



def wait_pinned(state: LabState, host: str, timeout: float = 30.0) -> None:
    """Until ``host``'s agent has loaded the datapath: every map pinned (lab up returns before that)."""
    deadline = time.monotonic() + timeout
    missing = list(t4_ebpf.ALL_MAPS)
    while missing and time.monotonic() < deadline:
        missing = [m for m in t4_ebpf.ALL_MAPS if not t4_ebpf.map_path(state, host, m).exists()]
        if missing:
            time.sleep(0.2)
    assert not missing, f"{host}: maps not pinned within {timeout} s: {missing}"
