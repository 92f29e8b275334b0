"""Lab links: veth pairs made directly between two namespaces, addresses, routes, a Linux bridge.

A veth is created from inside its first namespace with its peer placed straight
into the second, so neither end ever appears in the machine's namespace.
"""

from __future__ import annotations

from pyroute2 import IPRoute

IFF_UP = 1


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LookupError(f"no interface {ifname}")
    return int(found[0])


def veth(ns_a: str, if_a: str, ns_b: str, if_b: str, mtu: int | None = None) -> None:
    """A veth pair ``ns_a:if_a <-> ns_b:if_b``, both ends up."""
    peer: dict[str, object] = {"ifname": if_b, "net_ns_fd": ns_b}
    extra: dict[str, object] = {}
    if mtu is not None:
        peer["mtu"] = mtu
        extra["mtu"] = mtu
    with IPRoute(netns=ns_a, flags=0) as ipr:
        ipr.link("add", ifname=if_a, kind="veth", peer=peer, **extra)
        ipr.link("set", index=_index(ipr, if_a), state="up")
    with IPRoute(netns=ns_b, flags=0) as ipr:
        ipr.link("set", index=_index(ipr, if_b), state="up")


def delete(netns: str, ifname: str) -> bool:
    """Delete ``ifname`` in ``netns`` if it is there (a veth takes its peer with it)."""
    with IPRoute(netns=netns, flags=0) as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return False
        ipr.link("del", index=found[0])
        return True


def bridge(netns: str, name: str) -> None:
    """A Linux bridge (the management network's switch), up."""
    with IPRoute(netns=netns, flags=0) as ipr:
        ipr.link("add", ifname=name, kind="bridge")
        ipr.link("set", index=_index(ipr, name), state="up")


def enslave(netns: str, ifname: str, bridge_name: str) -> None:
    with IPRoute(netns=netns, flags=0) as ipr:
        ipr.link("set", index=_index(ipr, ifname), master=_index(ipr, bridge_name))


def address(netns: str, ifname: str, cidr: str) -> None:
    """Add ``cidr`` (``a.b.c.d/len``) to ``ifname``."""
    ip, _, prefixlen = cidr.partition("/")
    with IPRoute(netns=netns, flags=0) as ipr:
        ipr.addr("add", index=_index(ipr, ifname), address=ip, prefixlen=int(prefixlen))


def route(netns: str, dst: str, gateway: str) -> None:
    """``dst`` (CIDR) via ``gateway`` in ``netns``'s main table."""
    with IPRoute(netns=netns, flags=0) as ipr:
        ipr.route("replace", dst=dst, gateway=gateway)


def links(netns: str) -> set[str]:
    """Interface names in ``netns``."""
    with IPRoute(netns=netns, flags=0) as ipr:
        return {str(m.get("ifname")) for m in ipr.link("dump")}
