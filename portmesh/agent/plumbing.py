"""Host and container networking through netlink (pyroute2), as docs/components.md "Host dataplane" says.

Every function here reads first and changes only what differs, so running it
again, or after an agent restart, leaves flowing traffic untouched: no address
is re-added, no link bounced, no route replaced by an identical one.

pyroute2's sync API runs its own event loop, so call these from a worker thread
(``asyncio.to_thread``), never from inside a running loop.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from portmesh.agent import isolation
from portmesh.model.config import NetworkConfig
from portmesh.model.entities import Container, is_tunnel_port

BRIDGE = "br0"
CONTAINER_IF = "eth0"
LOCAL_COPY_TABLE = 100  # the container's public IPs' local routes, consulted only for packets from eth0
RULE_PREF = 1
TABLE_MAIN, TABLE_LOCAL = 254, 255
RTN_UNICAST, RTN_LOCAL = 1, 2
SCOPE_UNIVERSE, SCOPE_LINK, SCOPE_HOST = 0, 253, 254
RTPROT_STATIC = 4
RTNH_F_ONLINK = 4
RTM_F_CLONED = 0x200  # a route dump's cached entries (learnt path MTUs): the kernel's, not configuration
IFF_UP = 1


class PlumbingError(RuntimeError):
    """Something the host does not let us build (missing bridge port, missing namespace...)."""


def netns_path(netns: str) -> str:
    """The file of a network namespace given by name (``/run/netns/<name>``) or by path.

    Light containers have named namespaces; a Docker/Podman container's namespace
    is only reachable as ``/proc/<pid>/ns/net`` of its main process, and naming it
    (a bind mount under /run/netns) would keep a dead container's namespace, and
    its veth, alive after a restart.
    """
    return netns if "/" in netns else f"/run/netns/{netns}"


def netns_identity(netns: str) -> tuple[str, int, int]:
    """The namespace's path, device and inode: different once a restarted container has a new one.

    The inode alone is not enough: the kernel reuses a freed namespace's inode
    number at once, and a restarted container's new namespace often gets it. The
    path of an image container's namespace names its main process, which changes.
    """
    st = os.stat(netns_path(netns))
    return netns, st.st_dev, st.st_ino


# -- small netlink helpers -------------------------------------------------------


def _index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _link(ipr: IPRoute, index: int) -> Any:
    return ipr.link("get", index=index)[0]


def _ensure_up(ipr: IPRoute, index: int) -> None:
    if not _link(ipr, index)["flags"] & IFF_UP:
        ipr.link("set", index=index, state="up")


def _addresses(ipr: IPRoute, index: int) -> set[tuple[str, int]]:
    return {(str(m.get("address")), int(m["prefixlen"])) for m in ipr.addr("dump", index=index) if m["family"] == socket.AF_INET}


def _routes(ipr: IPRoute, table: int) -> list[Any]:
    return [r for r in ipr.route("dump", family=socket.AF_INET) if r.get("table") == table]


def _has_route(
    routes: Iterable[Any],
    dst: str,
    dst_len: int,
    oif: int,
    rtype: int = RTN_UNICAST,
    gateway: str | None = None,
    mtu: int | None = None,
) -> bool:
    for r in routes:
        if (
            (r.get("dst") or "0.0.0.0") == dst
            and r["dst_len"] == dst_len
            and r["type"] == rtype
            and r.get("oif") == oif
            and r.get("gateway") == gateway
            and (mtu is None or r.get_nested("RTA_METRICS", "RTAX_MTU") == mtu)
        ):
            return True
    return False


def _ensure_route(
    ipr: IPRoute,
    table: int,
    dst: str,
    dst_len: int,
    oif: int,
    *,
    rtype: int = RTN_UNICAST,
    scope: int = SCOPE_LINK,
    gateway: str | None = None,
    flags: int = 0,
    mtu: int | None = None,
) -> None:
    if _has_route(_routes(ipr, table), dst, dst_len, oif, rtype, gateway, mtu):
        return
    spec: dict[str, Any] = {
        "dst": f"{dst}/{dst_len}",
        "oif": oif,
        "table": table,
        "type": rtype,
        "scope": scope,
        "proto": RTPROT_STATIC,
    }
    if gateway is not None:
        spec["gateway"] = gateway
    if flags:
        spec["flags"] = flags
    if mtu is not None:
        spec["metrics"] = {"mtu": mtu}
    ipr.route("replace", **spec)


def write_sysctls(values: Mapping[str, str], netns: str | None = None) -> None:
    """Set ``/proc/sys`` values that differ, inside ``netns`` if given.

    Net sysctls are per namespace and resolved against the calling *thread's*
    namespace, so a short-lived thread enters the namespace and writes them;
    the agent's own threads never move.
    """
    errors: list[BaseException] = []

    def work() -> None:
        try:
            if netns is not None:
                with open(netns_path(netns), "rb") as ns:
                    pr_netns.setns(ns.fileno(), flags=0)
            for key, value in values.items():
                path = Path("/proc/sys") / key.replace(".", "/")
                if " ".join(path.read_text().split()) != " ".join(value.split()):
                    path.write_text(value)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=work, name=f"sysctl-{netns or 'host'}")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


# -- host ------------------------------------------------------------------------


def ensure_host_gateway(
    config: NetworkConfig,
    bridge: str = BRIDGE,
    *,
    underlay_dev: str | None = None,
    peers: Iterable[tuple[IPv4Address, int]] = (),
    compute: bool = False,
) -> None:
    """The bridge's internal port is the containers' gateway: address, up, pool routes, forwarding, firewall.

    Runs in the host's namespace; the bridge's internal port must already exist
    (``ovs-vswitchd`` makes it when the bridge is created). The gateway address is
    a /32 (``config.gateway_prefix``) and the public pools are on-link routes: a
    /16 would make the host claim all of 169.254.0.0/16 and shadow a cloud's
    metadata service (169.254.169.254). The gateway address with any other prefix
    (an older agent's /16) is replaced. The host firewall goes on before
    forwarding is turned on; ``peers`` (underlay IP, VNI of its tunnel) are the only VXLAN it
    accepts, and a ``compute`` host forwards nothing from br0 (isolation.firewall_rules).
    """
    gw = str(config.gateway_ip)
    with IPRoute() as ipr:
        index = _index(ipr, bridge)
        if index is None:
            raise PlumbingError(f"bridge port {bridge} does not exist yet")
        _ensure_up(ipr, index)
        have = _addresses(ipr, index)
        # br0 holds the gateway address only: another one is an older gateway address (or prefix).
        for address, prefixlen in sorted(have - {(gw, config.gateway_prefix)}):
            ipr.addr("del", index=index, address=address, prefixlen=prefixlen)
        if (gw, config.gateway_prefix) not in have:
            ipr.addr("add", index=index, address=gw, prefixlen=config.gateway_prefix)
        # The route's MTU, not br0's (config.egress_mtu, lower), bounds what the host forwards to
        # containers: inbound packets of full container size go in unclamped.
        for pool in config.public_pools:
            _ensure_route(ipr, TABLE_MAIN, str(pool.network_address), pool.prefixlen, index, mtu=config.container_mtu)
        # A pool removed from the config (pools live in the store) loses its on-link route here.
        pools = {(str(p.network_address), p.prefixlen) for p in config.public_pools}
        for r in _routes(ipr, TABLE_MAIN):
            dst = (str(r.get("dst") or "0.0.0.0"), int(r["dst_len"]))
            if (r.get("oif") == index and r["type"] == RTN_UNICAST and r.get("proto") == RTPROT_STATIC
                    and r.get("gateway") is None and dst not in pools):
                ipr.route("del", dst=f"{dst[0]}/{dst[1]}", oif=index, table=TABLE_MAIN, proto=RTPROT_STATIC)
    host_firewall(config, bridge, underlay_dev=underlay_dev, peers=peers, compute=compute)
    # br0 is the containers' IPv4 gateway only: no IPv6 router solicitations or DAD from the host into the switch.
    sysctls = {"net.ipv4.ip_forward": "1"}
    if Path(f"/proc/sys/net/ipv6/conf/{bridge}").is_dir():
        sysctls[f"net.ipv6.conf.{bridge}.disable_ipv6"] = "1"
    write_sysctls(sysctls)


def host_firewall(
    config: NetworkConfig,
    bridge: str = BRIDGE,
    *,
    underlay_dev: str | None = None,
    peers: Iterable[tuple[IPv4Address, int]] = (),
    compute: bool = False,
) -> bool:
    """Table ``inet portmesh`` as the config, the underlay, the peers and the host's role say; True if written."""
    return isolation.ensure_host_firewall(
        bridge, config.protected_networks, vxlan_port=config.vxlan_port, underlay_dev=underlay_dev, peers=peers,
        compute=compute,
    )


def link_mtu(name: str) -> int | None:
    """The MTU of device ``name`` in this namespace, None if there is no such device."""
    with IPRoute() as ipr:
        index = _index(ipr, name)
        return None if index is None else int(_link(ipr, index).get("mtu") or 0) or None


def ensure_uplink(uplink: str, config: NetworkConfig) -> bool:
    """The kernel's copy of inbound pool traffic on ``uplink`` dropped at ingress (isolation.ensure_uplink);
    True if written. Call once ``uplink`` is a br0 port: from then on the switch maps that traffic."""
    with IPRoute() as ipr:
        if _index(ipr, uplink) is None:
            raise PlumbingError(f"uplink {uplink} does not exist on this host")
    return isolation.ensure_uplink(uplink, config.public_pools)


def recheck_isolation(
    config: NetworkConfig,
    bridge: str = BRIDGE,
    *,
    container_ports: Iterable[str] | None = None,
    tunnel_ports: Iterable[str] = (),
    underlay_dev: str | None = None,
    peers: Iterable[tuple[IPv4Address, int]] = (),
    compute: bool = False,
) -> None:
    """The agent's full re-check: every container port (``container_ports``, read here if None) and tunnel
    device (``tunnel_ports``) on the host isolated (and no chain for a gone one), the host firewall as it
    must be. See :mod:`portmesh.agent.isolation`."""
    if isolation.needed():
        ports = host_ports() if container_ports is None else set(container_ports)
        # Tunnel chains are tunnels.py's to delete (with their device): one of a device made by a
        # pass that then failed must not go here while the device is up.
        isolation.sync_ports(ports | set(tunnel_ports), spare=is_tunnel_port)
    host_firewall(config, bridge, underlay_dev=underlay_dev, peers=peers, compute=compute)


# -- containers --------------------------------------------------------------------


def container_sysctls(container: Container) -> dict[str, str]:
    """The per-namespace settings a container needs (docs/components.md)."""
    return {
        "net.ipv4.ip_nonlocal_bind": "1",
        "net.ipv4.ip_local_port_range": f"{container.block.start} {container.block.end}",
        "net.ipv6.conf.all.disable_ipv6": "1",
        "net.ipv6.conf.default.disable_ipv6": "1",
    }


def plumb_container(container: Container, netns: str, config: NetworkConfig, outside_mtu: int | None = None) -> bool:
    """Connect ``container`` (already in namespace ``netns``, a name or a path) to the host; idempotent.

    Returns True if the veth was (re)made: a bridge port of that name must then be
    re-attached (:meth:`portmesh.agent.bridge.Bridge.reattach_ports`), because
    ``ovs-vswitchd`` keeps reading the vanished device and never opens the new
    one. (That went unnoticed while the host kernel forwarded such a container's
    traffic itself; see isolation.py.)

    Host end ``container.port_name`` stays in the host namespace (bridge.py adds
    it to br0); container end ``eth0`` gets the MAC, MTU, /32 public IPs, the
    gateway routes, and the policy-routing rule that sends traffic to its own
    public IP out through the switch while arriving traffic is still delivered.
    ``outside_mtu`` (the uplink's, on a host with one) sets eth0's MTU and adds
    routes to the pools with the tunnels' MTU (:meth:`NetworkConfig.container_mtus`).
    A host end whose peer is not ``eth0`` in ``netns`` (left from the namespace a
    restarted container had) is replaced.
    """
    if not os.path.exists(netns_path(netns)):
        raise PlumbingError(f"network namespace {netns} does not exist")
    host_if = container.port_name
    eth_mtu = config.container_mtus(outside_mtu)[0]
    with IPRoute() as ipr:
        index = _index(ipr, host_if)
        if index is not None and not _peer_is_eth0(ipr, index, netns):
            ipr.link("del", index=index)
            index = None
        made = index is None
        if index is None:
            ipr.link(
                "add",
                ifname=host_if,
                kind="veth",
                peer={"ifname": CONTAINER_IF, "net_ns_fd": netns, "address": container.mac, "mtu": eth_mtu},
            )
            index = _index(ipr, host_if)
            if index is None:
                raise PlumbingError(f"veth {host_if} vanished right after creation")
        # Before the port is up: the host's IP stack never processes a frame from it (isolation.py).
        if isolation.needed():
            isolation.isolate_port(host_if)
        # The host end is only a bridge port: no IPv6 link-local address, no DAD or router solicitations.
        if Path(f"/proc/sys/net/ipv6/conf/{host_if}").is_dir():
            write_sysctls({f"net.ipv6.conf.{host_if}.disable_ipv6": "1"})
        _ensure_up(ipr, index)
    # Disabling IPv6 first keeps eth0 from ever sending router solicitations or DAD probes.
    write_sysctls(container_sysctls(container), netns)
    with IPRoute(netns=netns, flags=0) as ipr:
        _plumb_inside(ipr, container, config, outside_mtu)
    return made


def _peer_is_eth0(ipr: IPRoute, host_index: int, netns: str) -> bool:
    """True if the veth at ``host_index`` pairs with ``eth0`` inside ``netns`` (each end names the other's index)."""
    peer_index = _link(ipr, host_index).get("link")
    with IPRoute(netns=netns, flags=0) as inner:
        eth = _index(inner, CONTAINER_IF)
        return eth is not None and eth == peer_index and _link(inner, eth).get("link") == host_index


def _plumb_inside(ipr: IPRoute, container: Container, config: NetworkConfig, outside_mtu: int | None) -> None:
    lo = _index(ipr, "lo")
    if lo is not None:
        _ensure_up(ipr, lo)
    eth = _index(ipr, CONTAINER_IF)
    if eth is None:
        raise PlumbingError(f"{CONTAINER_IF} is missing in the container's namespace")
    link = _link(ipr, eth)
    if str(link.get("address")).lower() != container.mac.lower():
        ipr.link("set", index=eth, state="down")
        ipr.link("set", index=eth, address=container.mac)
    eth_mtu, pool_mtu = config.container_mtus(outside_mtu)
    if link.get("mtu") != eth_mtu:
        ipr.link("set", index=eth, mtu=eth_mtu)
    _ensure_up(ipr, eth)

    wanted = {(str(ip), 32) for ip in container.ips}
    have = _addresses(ipr, eth)
    for address, prefixlen in sorted(have - wanted):
        ipr.addr("del", index=eth, address=address, prefixlen=prefixlen)
    for address, prefixlen in sorted(wanted - have):
        ipr.addr("add", index=eth, address=address, prefixlen=prefixlen)

    gw = str(config.gateway_ip)
    _ensure_route(ipr, TABLE_MAIN, gw, 32, eth)
    _ensure_route(ipr, TABLE_MAIN, "0.0.0.0", 0, eth, scope=SCOPE_UNIVERSE, gateway=gw, flags=RTNH_F_ONLINK)
    pools = _pool_routes(config, pool_mtu)
    for dst, dst_len in pools:
        _ensure_route(ipr, TABLE_MAIN, dst, dst_len, eth, scope=SCOPE_UNIVERSE, gateway=gw, flags=RTNH_F_ONLINK,
                      mtu=pool_mtu)
    # A pool route no longer wanted (the host lost its uplink, a pool went) goes; the default route stays.
    for r in _routes(ipr, TABLE_MAIN):
        to = (str(r.get("dst") or "0.0.0.0"), int(r["dst_len"]))
        if (r.get("oif") == eth and r.get("gateway") == gw and to[1] > 0 and to not in pools
                and not r["flags"] & RTM_F_CLONED):
            ipr.route("del", dst=f"{to[0]}/{to[1]}", oif=eth, gateway=gw, table=TABLE_MAIN, proto=r["proto"])
    _move_local_routes(ipr, container.ips, eth)
    _ensure_rule(ipr)


def _pool_routes(config: NetworkConfig, pool_mtu: int | None) -> set[tuple[str, int]]:
    """The (dst, dst_len) of the routes to the public pools a container needs: none without ``pool_mtu``."""
    if pool_mtu is None:
        return set()
    return {(str(p.network_address), p.prefixlen) for p in config.public_pools}


def _move_local_routes(ipr: IPRoute, ips: Iterable[IPv4Address], eth: int) -> None:
    """Each public IP's ``local`` route lives in table 100 (only for packets from eth0), not in ``local``."""
    for ip in ips:
        dst = str(ip)
        _ensure_route(ipr, LOCAL_COPY_TABLE, dst, 32, eth, rtype=RTN_LOCAL, scope=SCOPE_HOST)
        for r in _routes(ipr, TABLE_LOCAL):
            if r.get("dst") == dst and r["dst_len"] == 32 and r["type"] == RTN_LOCAL:
                ipr.route(
                    "del",
                    dst=f"{dst}/32",
                    table=TABLE_LOCAL,
                    type=RTN_LOCAL,
                    oif=r.get("oif"),
                    scope=SCOPE_HOST,
                    proto=r["proto"],
                )


def _ensure_rule(ipr: IPRoute) -> None:
    for rule in ipr.rule("dump", family=socket.AF_INET):
        if rule.get("priority") == RULE_PREF and rule.get("iifname") == CONTAINER_IF and rule.get("table") == LOCAL_COPY_TABLE:
            return
    ipr.rule("add", family=socket.AF_INET, priority=RULE_PREF, iifname=CONTAINER_IF, table=LOCAL_COPY_TABLE)


def unplumb_container(container_port_name: str) -> None:
    """Delete the container's veth (both ends go) and its isolation chain; harmless if already gone."""
    with IPRoute() as ipr:
        index = _index(ipr, container_port_name)
        if index is not None:
            ipr.link("del", index=index)
    if isolation.needed():
        isolation.release_port(container_port_name)


def is_container_port(name: str) -> bool:
    """True for names made by :func:`portmesh.model.entities.port_name_for` (``pm`` + 12 hex digits)."""
    return len(name) == 14 and name.startswith("pm") and all(ch in "0123456789abcdef" for ch in name[2:])


def host_ports() -> set[str]:
    """Container ports (host ends of container veths) present in this namespace."""
    with IPRoute() as ipr:
        return {str(m.get("ifname")) for m in ipr.link("dump") if is_container_port(str(m.get("ifname")))}


# -- drift: read-only checks of what plumb_container built ----------------------------
#
# The agent's full pass asks these which plumbed containers drifted (a route, address or
# rule deleted behind its back) and re-plumbs only those. Opening a netlink socket into a
# namespace through pyroute2's ``IPRoute(netns=...)`` costs ~7 ms (a helper process);
# one thread that enters each namespace in turn (setns) and opens a plain socket there
# reads a namespace in ~2 ms, and nothing else of the agent moves.


@dataclass(frozen=True)
class NsView:
    """One namespace's links, IPv4 addresses, routes and rules, as read at once."""

    links: dict[str, tuple[int, int, str, int, int | None]]  # name -> (index, flags, mac, mtu, peer index)
    addrs: set[tuple[int, str, int]]  # (index, address, prefixlen)
    routes: set[tuple[int, str, int, int, int | None, str | None, int | None]]  # (table, dst, dst_len, type, oif, gateway, mtu)
    rules: set[tuple[int | None, str | None, int | None]]  # (priority, iifname, table)


def _view(ipr: IPRoute) -> NsView:
    links = {
        str(m.get("ifname")): (
            int(m["index"]), int(m["flags"]), str(m.get("address")).lower(), int(m.get("mtu") or 0), m.get("link")
        )
        for m in ipr.link("dump")
    }
    addrs = {
        (int(m["index"]), str(m.get("address")), int(m["prefixlen"])) for m in ipr.addr("dump") if m["family"] == socket.AF_INET
    }
    routes = {
        (int(r.get("table") or 0), str(r.get("dst") or "0.0.0.0"), int(r["dst_len"]), int(r["type"]),
         r.get("oif"), r.get("gateway"), r.get_nested("RTA_METRICS", "RTAX_MTU"))
        for r in ipr.route("dump", family=socket.AF_INET)
        if not r["flags"] & RTM_F_CLONED
    }
    rules = {(r.get("priority"), r.get("iifname"), r.get("table")) for r in ipr.rule("dump", family=socket.AF_INET)}
    return NsView(links, addrs, routes, rules)


def host_view() -> NsView:
    """The host namespace's view (container veths' host ends, their state and peers)."""
    with IPRoute() as ipr:
        return _view(ipr)


def read_namespaces(netnses: Iterable[str], budget: float | None = None) -> dict[str, NsView | Exception]:
    """Read each namespace in order, in one short-lived thread that enters them in turn.

    Stops once ``budget`` seconds are spent (the caller resumes from there next time);
    a namespace that cannot be read maps to its exception.
    """
    out: dict[str, NsView | Exception] = {}

    def work() -> None:
        deadline = None if budget is None else time.monotonic() + budget
        for netns in netnses:
            if deadline is not None and out and time.monotonic() > deadline:
                return
            try:
                with open(netns_path(netns), "rb") as ns:
                    pr_netns.setns(ns.fileno(), flags=0)
                with IPRoute() as ipr:
                    out[netns] = _view(ipr)
            except Exception as exc:
                out[netns] = exc

    thread = threading.Thread(target=work, name="drift-read")
    thread.start()
    thread.join()
    return out


def container_drift(
    container: Container, config: NetworkConfig, host: NsView, inside: NsView, outside_mtu: int | None = None
) -> list[str]:
    """What differs from what :func:`plumb_container` builds (sysctls aside); empty when nothing does."""
    host_if = host.links.get(container.port_name)
    if host_if is None:
        return [f"veth {container.port_name} is missing"]
    eth = inside.links.get(CONTAINER_IF)
    if eth is None:
        return [f"{CONTAINER_IF} is missing"]
    problems: list[str] = []
    if host_if[4] != eth[0] or eth[4] != host_if[0]:
        problems.append(f"{container.port_name} does not pair with {CONTAINER_IF}")
    if not host_if[1] & IFF_UP:
        problems.append(f"{container.port_name} is down")
    lo = inside.links.get("lo")
    if lo is not None and not lo[1] & IFF_UP:
        problems.append("lo is down")
    index, flags, mac, mtu, _ = eth
    if mac != container.mac.lower():
        problems.append(f"MAC {mac}")
    eth_mtu, pool_mtu = config.container_mtus(outside_mtu)
    if mtu != eth_mtu:
        problems.append(f"MTU {mtu}")
    if not flags & IFF_UP:
        problems.append(f"{CONTAINER_IF} is down")
    wanted = {(index, str(ip), 32) for ip in container.ips}
    have = {a for a in inside.addrs if a[0] == index}
    if have != wanted:
        problems.append(f"addresses {sorted(a[1:] for a in have)}")
    gw = str(config.gateway_ip)
    Route = tuple[int, str, int, int, int | None, str | None, int | None]
    pools: set[Route] = {(TABLE_MAIN, dst, n, RTN_UNICAST, index, gw, pool_mtu) for dst, n in _pool_routes(config, pool_mtu)}
    needed: set[Route] = {
        (TABLE_MAIN, gw, 32, RTN_UNICAST, index, None, None), (TABLE_MAIN, "0.0.0.0", 0, RTN_UNICAST, index, gw, None)
    }
    needed |= {(LOCAL_COPY_TABLE, str(ip), 32, RTN_LOCAL, index, None, None) for ip in container.ips}
    for route in sorted((needed | pools) - inside.routes, key=str):
        problems.append(f"route {route[1]}/{route[2]} table {route[0]} (MTU {route[6]}) is missing")
    for route in sorted((r for r in inside.routes if r[0] == TABLE_MAIN and r[5] == gw and r[2] > 0 and r not in pools),
                        key=str):
        problems.append(f"route {route[1]}/{route[2]} via the gateway is not wanted")
    ips = {str(ip) for ip in container.ips}
    if any(r[0] == TABLE_LOCAL and r[3] == RTN_LOCAL and r[2] == 32 and r[1] in ips for r in inside.routes):
        problems.append("a public IP's local route is back in table local")
    if (RULE_PREF, CONTAINER_IF, LOCAL_COPY_TABLE) not in inside.rules:
        problems.append("the policy rule is missing")
    return problems


def isolated_chains() -> set[str] | None:
    """Container ports with their isolation chain, or None where none are needed (kernel datapath)."""
    return isolation.isolated_ports() if isolation.needed() else None
