"""The VXLAN mesh between hosts: one kernel VXLAN device per peer host, a plain port of br0.

Why kernel devices: OVS 3.1's own userspace VXLAN port drops every packet that carries
offload flags (ARCHITECTURE.md), so each host keeps, for each other host B with an
underlay address, a device named ``B.tunnel_port`` (``local`` = this host's underlay IP,
``remote`` = B's, ``dstport``, ``dev`` = the underlay interface, MTU = underlay MTU - 50,
no learning: the controller says where every MAC is). The name is the same on every host,
so the controller finds on each switch the port that leads to B.

The VNI is one per PAIR of hosts (:func:`pair_vni`), not the config's ``vxlan_vni`` on every
device: the kernel demultiplexes arriving VXLAN by (VNI, UDP port, local address) only, so it
refuses a second device with the same VNI and local address ("File exists"), whatever its
remote. Both ends compute the same VNI from the two names, offset by ``vxlan_vni``.

:func:`plan` is pure (the store's snapshot in, the devices wanted out); :func:`realise`
reads the host's links once and changes only what differs: a missing device is made, one
whose parameters differ is remade (its br0 port must then be re-attached: userspace OVS
keeps a port bound to a deleted device), one leading to a host that left is deleted with
its isolation chain. A device gets its nftables ingress drop chain (isolation.py) before
it is up, so the host kernel never processes a decapsulated frame. :func:`status` says,
per peer, "up" or "down: <reason>" for the agent's report.

pyroute2's sync API: call from a worker thread, as plumbing.py.
"""

from __future__ import annotations

import errno
import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from portmesh.agent import isolation
from portmesh.model.entities import DesiredState, is_tunnel_port

log = logging.getLogger("portmesh.agent")

VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
IFF_UP = 1


@dataclass(frozen=True, order=True)
class TunnelSpec:
    """One VXLAN device this host must have: ``name`` leads to host ``peer``."""

    name: str
    peer: str
    vni: int
    local: IPv4Address
    remote: IPv4Address
    port: int
    dev: str


@dataclass(frozen=True)
class Device:
    """A tunnel-named device as the kernel has it (``kind`` "vxlan" or anything else)."""

    name: str
    index: int
    kind: str
    vni: int | None = None
    local: IPv4Address | None = None
    remote: IPv4Address | None = None
    port: int | None = None
    link: int | None = None
    learning: int | None = None
    mtu: int = 0
    up: bool = False


@dataclass
class Realised:
    """What :func:`realise` did and what it could not do."""

    made: list[str] = field(default_factory=list)  # created or re-created: re-attach to br0
    removed: list[str] = field(default_factory=list)  # devices of hosts that left
    errors: dict[str, str] = field(default_factory=dict)  # device name -> why it is not as planned
    underlay_problem: str = ""  # set when nothing could be made (no such device, address not on it)
    present: set[str] = field(default_factory=set)  # planned devices that exist afterwards


VNI_SPACE = 1 << 24


def pair_vni(base: int, a: str, b: str) -> int:
    """The VNI of the tunnel between hosts ``a`` and ``b`` (symmetric): ``base`` plus a 24-bit digest of the pair.

    A host's tunnels need distinct VNIs; two peers of one host whose pairs digest alike
    (odds ~ n^2 / 2^25 for n peers) are caught by :func:`realise` and reported down.
    """
    lo, hi = sorted((a, b))
    digest = int.from_bytes(hashlib.blake2b(f"vni:{lo}\0{hi}".encode(), digest_size=3).digest(), "big")
    return (base + digest) % VNI_SPACE or 1


def plan(state: DesiredState, host: str, underlay_dev: str) -> dict[str, TunnelSpec]:
    """The devices ``host`` must have, by name: one per peer (``state.peers_of(host)``).

    Empty when ``host`` is unknown or has no underlay address (it takes part in no mesh).
    """
    me = state.hosts.get(host)
    if me is None or me.underlay_ip is None:
        return {}
    cfg = state.config
    specs = (
        TunnelSpec(peer.tunnel_port, peer.name, pair_vni(cfg.vxlan_vni, host, peer.name), me.underlay_ip, peer.underlay_ip,
                   cfg.vxlan_port, underlay_dev)
        for peer in state.peers_of(host)
        if peer.underlay_ip is not None
    )
    return {s.name: s for s in specs}


def differences(spec: TunnelSpec, dev: Device, underlay_index: int, mtu: int) -> list[str]:
    """How ``dev`` differs from ``spec`` on an underlay at ``underlay_index`` with device MTU ``mtu``; empty if not."""
    if dev.kind != "vxlan":
        return [f"a {dev.kind or 'non-vxlan'} device holds the name"]
    wanted = {
        "vni": (dev.vni, spec.vni),
        "local": (dev.local, spec.local),
        "remote": (dev.remote, spec.remote),
        "dstport": (dev.port, spec.port),
        "dev": (dev.link, underlay_index),
        "learning": (dev.learning, 0),
        "mtu": (dev.mtu, mtu),
    }
    return [f"{key} {have} (wanted {want})" for key, (have, want) in wanted.items() if have != want]


def _device(msg: Any) -> Device:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = str(info.get_attr("IFLA_INFO_KIND") or "") if info is not None else ""
    data = info.get_attr("IFLA_INFO_DATA") if info is not None and kind == "vxlan" else None

    def attr(name: str) -> Any:
        return data.get_attr(name) if data is not None else None

    local, remote = attr("IFLA_VXLAN_LOCAL"), attr("IFLA_VXLAN_GROUP")
    return Device(
        name=str(msg.get_attr("IFLA_IFNAME")),
        index=int(msg["index"]),
        kind=kind,
        vni=attr("IFLA_VXLAN_ID"),
        local=IPv4Address(local) if local else None,
        remote=IPv4Address(remote) if remote else None,
        port=attr("IFLA_VXLAN_PORT"),
        link=attr("IFLA_VXLAN_LINK"),
        learning=attr("IFLA_VXLAN_LEARNING"),
        mtu=int(msg.get_attr("IFLA_MTU") or 0),
        up=bool(msg["flags"] & IFF_UP),
    )


def read_devices(ipr: IPRoute, names: Iterable[str]) -> dict[str, Device]:
    """The tunnel-named devices among ``names`` that exist, each asked for by name.

    Not a link dump: pyroute2 parses every link of the namespace in Python (~1-2 ms each),
    and a host with 1,000 containers has 1,000 veths: a dump took 2-3 s, by name it is ~1 ms
    per tunnel. The caller names the candidates: the planned devices and those it knows of
    (br0's tunnel ports, the isolation chains, what it saw before), which is where a device
    of a host that left can be.
    """
    out = {}
    for name in sorted(set(names)):
        if not is_tunnel_port(name):
            continue
        try:
            msgs = ipr.link("get", ifname=name)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                continue
            raise
        out[name] = _device(msgs[0])
    return out


def _underlay(ipr: IPRoute, specs: Iterable[TunnelSpec]) -> tuple[int, int, str]:
    """(index, MTU, problem) of the underlay device the specs name; problem is "" when it can carry them."""
    first = next(iter(specs), None)
    if first is None:
        return 0, 0, ""
    found = ipr.link_lookup(ifname=first.dev)
    if not found:
        return 0, 0, f"underlay device {first.dev} does not exist"
    index = int(found[0])
    mtu = int(ipr.link("get", index=index)[0].get_attr("IFLA_MTU") or 0)
    addresses = {str(m.get_attr("IFA_ADDRESS")) for m in ipr.addr("dump", index=index)}
    if str(first.local) not in addresses:
        return index, mtu, f"underlay address {first.local} is not on {first.dev}"
    return index, mtu, ""


def realise(specs: Mapping[str, TunnelSpec], known: Iterable[str] = ()) -> Realised:
    """Make the namespace's tunnel devices exactly ``specs`` (idempotent; reads before it writes).

    ``known``: other names a tunnel device may have here (br0's tunnel ports, names seen
    before); with the tunnel-named isolation chains, where a device to a host that left is
    looked for (see :func:`read_devices`). ``Realised.present`` lists the devices left.
    """
    out = Realised()
    userspace = isolation.needed()
    chains = isolation.isolated_ports() if userspace else set()
    with IPRoute() as ipr:
        have = read_devices(ipr, set(specs) | set(known) | chains)
        for name in sorted(set(have) - set(specs)):
            log.info("tunnel %s: its host left the mesh; removing it", name)
            ipr.link("del", index=have[name].index)
            out.removed.append(name)
    if userspace:
        # With their device, and those left without one (a device deleted behind our back).
        orphans = {c for c in chains if is_tunnel_port(c) and c not in specs and c not in have}
        for name in sorted(set(out.removed) | orphans):
            isolation.release_port(name)
    out.present = {n for n in have if n in specs}
    if not specs:
        return out
    with IPRoute() as ipr:
        underlay_index, underlay_mtu, problem = _underlay(ipr, specs.values())
        if problem:
            out.underlay_problem = problem
            return out
        mtu = underlay_mtu - VXLAN_OVERHEAD
        vni_owner: dict[int, str] = {}
        for name, spec in sorted(specs.items()):
            if spec.vni in vni_owner:
                out.errors[name] = f"VNI {spec.vni} is also the tunnel to {vni_owner[spec.vni]}'s (rename a host)"
                continue
            vni_owner[spec.vni] = spec.peer
            try:
                dev = have.get(name)
                diff = differences(spec, dev, underlay_index, mtu) if dev is not None else ["missing"]
                if dev is not None and diff:
                    log.warning("tunnel %s to %s differs (%s); remaking it", name, spec.peer, "; ".join(diff))
                    ipr.link("del", index=dev.index)
                    dev = None
                if dev is None:
                    _make(ipr, spec, underlay_index, mtu)
                    out.made.append(name)
                    out.present.add(name)
                    log.info("tunnel %s to %s made (remote %s, vni %d)", name, spec.peer, spec.remote, spec.vni)
                index = int(ipr.link_lookup(ifname=name)[0])
                # Before it is up: no decapsulated frame ever reaches the host's IP stack. A new device
                # gets a new chain: this kernel keeps a chain whose device was deleted, and whether it
                # hooks a new device of the same name is not something to rely on.
                if userspace and name in chains and name in out.made:
                    isolation.release_port(name)
                if userspace and (name not in chains or name in out.made):
                    isolation.isolate_port(name)
                # A bridge port only: no IPv6 link-local address, router solicitations or DAD from it.
                ipv6 = Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6")
                if ipv6.exists() and ipv6.read_text().strip() != "1":
                    ipv6.write_text("1")
                if not ipr.link("get", index=index)[0]["flags"] & IFF_UP:
                    ipr.link("set", index=index, state="up")
            except Exception as exc:
                log.exception("tunnel %s to %s could not be made", name, spec.peer)
                out.errors[name] = f"{type(exc).__name__}: {exc}"
    return out


def _make(ipr: IPRoute, spec: TunnelSpec, underlay_index: int, mtu: int) -> None:
    ipr.link(
        "add",
        ifname=spec.name,
        kind="vxlan",
        vxlan_id=spec.vni,
        vxlan_local=str(spec.local),
        vxlan_group=str(spec.remote),
        vxlan_port=spec.port,
        vxlan_link=underlay_index,
        vxlan_learning=0,
        mtu=mtu,
    )


def status(
    specs: Mapping[str, TunnelSpec], devices: Mapping[str, Device], on_bridge: set[str], underlay: tuple[int, int, str],
    errors: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Peer -> "up" (the device exists as planned, is up and is on br0) or "down: <reason>"."""
    underlay_index, underlay_mtu, problem = underlay
    out: dict[str, str] = {}
    for name, spec in specs.items():
        dev = devices.get(name)
        if problem:
            reason = problem
        elif errors and name in errors:
            reason = errors[name]
        elif dev is None:
            reason = f"device {name} is missing"
        elif diff := differences(spec, dev, underlay_index, underlay_mtu - VXLAN_OVERHEAD):
            reason = "; ".join(diff)
        elif not dev.up:
            reason = f"device {name} is down"
        elif name not in on_bridge:
            reason = f"{name} is not on br0"
        else:
            out[spec.peer] = "up"
            continue
        out[spec.peer] = f"down: {reason}"
    return out


def observe(specs: Mapping[str, TunnelSpec]) -> tuple[dict[str, Device], tuple[int, int, str]]:
    """Read the devices and the underlay for :func:`status` (one link dump, one address dump)."""
    with IPRoute() as ipr:
        return read_devices(ipr, specs), _underlay(ipr, specs.values())
