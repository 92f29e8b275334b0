"""Which datapath each lab host runs: ``lab up --datapath ovs|ebpf|h1=ovs,h2=ebpf``.

A host runs either Open vSwitch (and the controller programs it over OpenFlow) or the
eBPF datapath (its agent loads the program and fills its maps). Any mix is a valid
cloud: the hosts' tunnels carry the same frames either way.
"""

from __future__ import annotations

from collections.abc import Sequence

DATAPATHS = ("ovs", "ebpf")


def parse_datapaths(text: str, hosts: Sequence[str]) -> dict[str, str]:
    """``text`` -> {host: "ebpf"} for the hosts that run eBPF (OVS is the default and is left out).

    ``ovs`` or ``ebpf`` applies to every host; ``h2=ebpf,h3=ebpf`` names hosts one by one
    (unnamed hosts run OVS). A wrong word or an unknown host raises ValueError naming it.
    """
    text = text.strip()
    if text in DATAPATHS:
        return {h: text for h in hosts if text != "ovs"}
    chosen: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        host, sep, kind = item.partition("=")
        if not sep:
            raise ValueError(f"datapath {item!r}: expected {' or '.join(DATAPATHS)}, or HOST=DATAPATH pairs")
        if host not in hosts:
            raise ValueError(f"datapath {item!r}: no host {host!r} in this lab ({', '.join(hosts)})")
        if kind not in DATAPATHS:
            raise ValueError(f"datapath {item!r}: {kind!r} is not one of {', '.join(DATAPATHS)}")
        if host in chosen:
            raise ValueError(f"datapath {item!r}: host {host} is named twice")
        chosen[host] = kind
    return {h: k for h, k in chosen.items() if k != "ovs"}
