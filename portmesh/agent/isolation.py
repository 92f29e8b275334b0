"""Keep the host's own IP stack out of the containers' traffic: nftables, applied by the agent.

Why this exists: with the userspace datapath, ``ovs-vswitchd`` reads each port
through a packet socket, and a packet socket does not take the frame away from
the host kernel. Every frame a container sends was also handed to the host's IP
stack, which answered ARP for the gateway with the veth's own MAC and then routed
the container's packets itself (``ip_forward=1``), past every port-security flow.

Two tables, both named ``portmesh`` and owned by the agent alone:

- ``netdev portmesh``: one ingress chain per port (container veths and the VXLAN
  tunnel devices, whose decapsulated frames are for OVS only), named after the port,
  ``policy drop`` with no rules. The packet socket sees a frame before the ingress
  hook, so OVS still gets it; the host kernel never does. One chain per port (not
  one chain with a device list) because creating and deleting a single-device
  chain works on every kernel with nftables, while adding devices to an existing
  multi-device chain, or removing them, needs a recent one. Only needed with the
  userspace datapath: with the kernel datapath OVS's rx_handler takes the frame
  (and a netdev ingress drop would run before it), so nothing is installed there.
- ``inet portmesh``: the host firewall for the gateway port (br0's internal port,
  where OVS hands containers' traffic to the host). Nothing that arrives there may
  reach a socket of the host (``input``), and nothing may be forwarded to the
  link-local, management or underlay networks (``forward``); on a compute host
  nothing from it is forwarded at all. VXLAN (UDP ``vxlan_port``) is accepted only
  from the peer hosts' underlay addresses, each with the VNI of its own tunnel only
  (set ``tunnel_peers`` of address . VNI). Stateless on purpose:
  a ``ct`` expression would turn on conntrack for every forwarded connection of the
  host's namespace, the containers' data path included.

The rules are applied through libnftables, the library the ``nft`` command is
built on, loaded with ctypes (Debian's ``python3-nftables`` is the same thin
wrapper but lives outside a virtualenv): a transaction is applied atomically
from a text buffer with no process spawned, and the state is read back as JSON.
Every function reads first and writes only what differs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import threading
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

TABLE = "portmesh"
LINK_LOCAL = IPv4Network("169.254.0.0/16")
NFT_CTX_OUTPUT_JSON = 1 << 4


class NftError(RuntimeError):
    """libnftables refused a command; the message is nft's own error text."""


class Nft:
    """A libnftables context (the calling thread's network namespace); one command at a time."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            raise NftError(f"libnftables is not installed (Debian package nftables): {exc}") from exc
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        for fn in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
            getattr(lib, fn).restype = ctypes.c_char_p
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        self._lib = lib
        self._lock = threading.Lock()

    def run(self, commands: str, *, as_json: bool = False) -> str:
        """Run ``commands`` (nft syntax, one transaction); return nft's output or raise :class:`NftError`."""
        lib = self._lib
        with self._lock:
            ctx = lib.nft_ctx_new(0)
            try:
                lib.nft_ctx_buffer_output(ctx)
                lib.nft_ctx_buffer_error(ctx)
                lib.nft_ctx_output_set_flags(ctx, NFT_CTX_OUTPUT_JSON if as_json else 0)
                rc = lib.nft_run_cmd_from_buffer(ctx, commands.encode())
                out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode()
                err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode()
            finally:
                lib.nft_ctx_free(ctx)
        if rc != 0:
            raise NftError(err.strip() or f"nft failed: {commands!r}")
        return out

    def objects(self, command: str) -> list[dict[str, Any]]:
        """A ``list`` command's objects as JSON (``[]`` when the table does not exist)."""
        try:
            out = self.run(command, as_json=True)
        except NftError as exc:
            if "No such file or directory" in str(exc):
                return []
            raise
        return list(json.loads(out).get("nftables", [])) if out.strip() else []


_NFT: Nft | None = None


def nft() -> Nft:
    """The process's libnftables binding, loaded on first use."""
    global _NFT
    if _NFT is None:
        _NFT = Nft()
    return _NFT


def needed() -> bool:
    """True where OVS runs the userspace datapath (no openvswitch kernel module), as bridge.py decides."""
    return not Path("/sys/module/openvswitch").exists()


# -- container ports: the host kernel never sees their frames ---------------------------


def _port_chain(port: str) -> str:
    return f'add chain netdev {TABLE} {port} {{ type filter hook ingress device "{port}" priority filter; policy drop; }}\n'


def isolated_ports() -> set[str]:
    """Ports that have an ingress drop chain in ``netdev portmesh``."""
    return {o["chain"]["name"] for o in nft().objects(f"list table netdev {TABLE}") if "chain" in o}


def isolate_port(port: str) -> bool:
    """Give ``port`` its ingress drop chain unless it has one; True if added.

    Call after the device exists and before it is up, so no frame of it ever
    reaches the host's stack.
    """
    _check_name(port)
    try:
        nft().run(f"list chain netdev {TABLE} {port}")
        return False
    except NftError:
        pass
    nft().run(f"add table netdev {TABLE}\n" + _port_chain(port))
    return True


def release_port(port: str) -> bool:
    """Delete ``port``'s chain if there is one (a kernel may have dropped it with the device); True if deleted."""
    _check_name(port)
    try:
        nft().run(f"list chain netdev {TABLE} {port}")  # this chain only: plumbing asks per new veth
    except NftError:
        return False
    nft().run(f"delete chain netdev {TABLE} {port}")
    return True


def sync_ports(ports: Iterable[str], spare: Callable[[str], bool] | None = None) -> tuple[set[str], set[str]]:
    """Exactly ``ports`` have chains: missing ones added, others deleted, in one transaction.

    Returns (added, deleted). The agent's full re-check calls it with the
    container ports present on the host; chains for which ``spare(name)`` is true
    are never deleted here (the tunnel devices' chains: tunnels.py keeps those).
    """
    wanted = set(ports)
    for port in wanted:
        _check_name(port)
    have = isolated_ports()
    added, deleted = wanted - have, {p for p in have - wanted if spare is None or not spare(p)}
    if added or deleted:
        commands = f"add table netdev {TABLE}\n"
        commands += "".join(_port_chain(p) for p in sorted(added))
        commands += "".join(f"delete chain netdev {TABLE} {p}\n" for p in sorted(deleted))
        nft().run(commands)
    return added, deleted


def _check_name(port: str) -> None:
    """Device names go into nft text: only what an interface name may hold, nothing that parses."""
    if not port or len(port) > 15 or not all(ch.isalnum() or ch in "-_" for ch in port):
        raise ValueError(f"port name {port!r}: not an interface name nftables can take")


# -- the gateway port: containers reach the outside, nothing of the host's ------------------

PEER_SET = "tunnel_peers"  # (peer underlay IP . VNI) in ``inet portmesh``: the only VXLAN accepted
VNI_FIELD = "@th,96,24"  # the VNI: bytes 4-6 of the VXLAN header, after the 8-byte UDP header


def firewall_rules(
    bridge: str,
    protected: Iterable[IPv4Network],
    *,
    vxlan_port: int | None = None,
    underlay_dev: str | None = None,
    compute: bool = False,
) -> list[tuple[str, str, str]]:
    """(chain, rule, why) for the host firewall; ``why`` becomes the rule's comment.

    With ``vxlan_port``, UDP to that port is accepted only on ``underlay_dev`` and from
    the (address, VNI) pairs in set :data:`PEER_SET` (each peer host's underlay IP with the
    VNI of its own tunnel, so a peer cannot pose as another on that one's device; kept apart from
    the rules by :func:`ensure_host_firewall` so a host joining changes no rule): anyone
    else could inject frames into br0 through a tunnel device. The interface matters: a
    packet from the internet claiming a peer's source address reaches the kernel's VXLAN
    socket through the uplink just as well (the socket listens on every address), and the
    tunnel device takes it. Without ``underlay_dev`` (no tunnels), all of it is dropped. A ``compute`` host forwards nothing
    that arrives on the bridge: its containers leave through a tunnel to a gateway host,
    never through this host's own uplink (defence in depth behind the controller's flows).
    """
    _check_name(bridge)
    nets = ", ".join(str(n) for n in sorted({LINK_LOCAL, *protected}))
    rules = [
        ("input", f'iifname "{bridge}" drop', "containers reach nothing that listens on this host"),
        (
            "forward",
            f'iifname "{bridge}" ip daddr {{ {nets} }} drop',
            "containers reach no link-local, management or underlay network",
        ),
    ]
    if vxlan_port is not None:
        if not 0 < vxlan_port < 65536:
            raise ValueError(f"vxlan_port {vxlan_port}: not a UDP port")
        if underlay_dev is not None:
            _check_name(underlay_dev)
            rules.append((
                "input",
                f'iifname "{underlay_dev}" udp dport {vxlan_port} ip saddr . {VNI_FIELD} @{PEER_SET} accept',
                "VXLAN from peer hosts' underlay addresses, on the underlay",
            ))
        rules.append(("input", f"udp dport {vxlan_port} drop", "VXLAN from anyone else would inject frames into br0"))
    if compute:
        rules.append(("forward", f'iifname "{bridge}" drop', "a compute host never routes its containers' traffic out"))
    return rules


def ensure_host_firewall(
    bridge: str,
    protected: Iterable[IPv4Network],
    *,
    vxlan_port: int | None = None,
    underlay_dev: str | None = None,
    peers: Iterable[tuple[IPv4Address, int]] = (),
    compute: bool = False,
) -> bool:
    """Make table ``inet portmesh`` hold exactly :func:`firewall_rules` and set :data:`PEER_SET` exactly
    ``peers``; True if anything was written.

    Each rule's comment carries a digest of the whole rule set, so reading the
    comments back tells whether the table is current; when it is not, the table
    is replaced in one atomic transaction (no moment without the rules), the peer
    set's elements with it. When only the peers differ, just the elements are
    added and deleted, in one transaction.
    """
    rules = firewall_rules(bridge, protected, vxlan_port=vxlan_port, underlay_dev=underlay_dev, compute=compute)
    wanted_peers = {f"{IPv4Address(ip)} . {int(vni)}" for ip, vni in peers}
    digest = hashlib.blake2b(repr(rules).encode(), digest_size=6).hexdigest()
    # In the order nft lists them back: the input chain's rules, then the forward chain's.
    wanted = [(chain, f"{why} [{digest}]") for c in ("input", "forward") for chain, _rule, why in rules if chain == c]
    objects = nft().objects(f"list table inet {TABLE}")
    have = [(o["rule"]["chain"], o["rule"].get("comment", "")) for o in objects if "rule" in o]
    have_peers = {
        " . ".join(str(part) for part in e["concat"])
        for o in objects if o.get("set", {}).get("name") == PEER_SET
        for e in o["set"].get("elem", []) if isinstance(e, dict) and "concat" in e
    }
    if have == wanted and any(o.get("set", {}).get("name") == PEER_SET for o in objects):
        if have_peers == wanted_peers:
            return False
        commands = ""
        if wanted_peers - have_peers:
            commands += f"add element inet {TABLE} {PEER_SET} {{ {', '.join(sorted(wanted_peers - have_peers))} }}\n"
        if have_peers - wanted_peers:
            commands += f"delete element inet {TABLE} {PEER_SET} {{ {', '.join(sorted(have_peers - wanted_peers))} }}\n"
        nft().run(commands)
        return True
    elements = f" elements = {{ {', '.join(sorted(wanted_peers))} }};" if wanted_peers else ""
    body = f"  set {PEER_SET} {{ typeof ip saddr . {VNI_FIELD};{elements} }}\n"
    for chain in ("input", "forward"):
        body += f"  chain {chain} {{\n    type filter hook {chain} priority filter; policy accept;\n"
        body += "".join(f'    {rule} comment "{why} [{digest}]"\n' for c, rule, why in rules if c == chain)
        body += "  }\n"
    # add + delete + define in one buffer: one transaction, so the old rules hold until the new ones do.
    nft().run(f"add table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n{body}}}\n")
    return True


# -- the uplink as a switch port: the kernel's copy of inbound pool traffic goes ---------------

UPLINK_TABLE = "portmesh_uplink"  # netdev: one ingress chain on the uplink (apart from the ports' table, which
# sync_ports keeps to exactly the container and tunnel ports)


def uplink_rules(uplink: str, pools: Iterable[IPv4Network]) -> str:
    """The ``netdev portmesh_uplink`` table for ``uplink``: IPv4 to a pool is dropped at ingress, the rest accepted.

    ovs-vswitchd's packet socket on the uplink (a br0 port) has its copy of every frame
    already; the switch maps pool traffic straight to the containers. Dropping the
    kernel's copy here means the host never routes those frames a second time (through
    br0's internal port into the switch again: every inbound packet twice in a
    container). ARP, the host's own address and everything else stay the kernel's; the
    counter says how many frames the host did not route. No pools: an empty table.
    """
    _check_name(uplink)
    nets = ", ".join(str(n) for n in sorted(set(pools), key=lambda n: (int(n.network_address), n.prefixlen)))
    digest = hashlib.blake2b(f"{uplink} {nets}".encode(), digest_size=6).hexdigest()
    rule = f'    ip daddr {{ {nets} }} counter drop comment "pool traffic is the switch\'s [{digest}]"\n' if nets else ""
    return (f"table netdev {UPLINK_TABLE} {{\n  chain {uplink} {{\n"
            f'    type filter hook ingress device "{uplink}" priority filter; policy accept;\n'
            f'{rule}    counter comment "the kernel\'s own [{digest}]"\n  }}\n}}\n')


def ensure_uplink(uplink: str, pools: Iterable[IPv4Network]) -> bool:
    """Make ``netdev portmesh_uplink`` exactly :func:`uplink_rules`, atomically; True if written."""
    text = uplink_rules(uplink, pools)
    digest = text.split("[", 1)[1].split("]", 1)[0]
    objects = nft().objects(f"list table netdev {UPLINK_TABLE}")
    chains = [o["chain"]["name"] for o in objects if "chain" in o]
    comments = [o["rule"].get("comment", "") for o in objects if "rule" in o]
    if chains == [uplink] and comments and all(c.endswith(f"[{digest}]") for c in comments):
        return False
    nft().run(f"add table netdev {UPLINK_TABLE}\ndelete table netdev {UPLINK_TABLE}\n{text}")
    return True


def uplink_counters() -> dict[str, int]:
    """Packets counted by the uplink chain's rules: ``dropped`` (pool traffic) and ``kernel`` (the rest)."""
    out: dict[str, int] = {}
    for o in nft().objects(f"list table netdev {UPLINK_TABLE}"):
        rule = o.get("rule")
        if rule is None:
            continue
        packets = next((e["counter"]["packets"] for e in rule.get("expr", []) if "counter" in e), 0)
        out["dropped" if any("drop" in e for e in rule.get("expr", [])) else "kernel"] = int(packets)
    return out


def release_uplink() -> bool:
    """Delete the uplink's table (the agent runs without ``--uplink`` now); True if there was one."""
    if not nft().objects(f"list table netdev {UPLINK_TABLE}"):
        return False
    nft().run(f"delete table netdev {UPLINK_TABLE}")
    return True


def remove_host_firewall() -> None:
    """Delete the tables (tests and an operator's clean-up); harmless if absent."""
    for family, table in (("inet", TABLE), ("netdev", TABLE), ("netdev", UPLINK_TABLE)):
        if nft().objects(f"list table {family} {table}"):
            nft().run(f"delete table {family} {table}")
