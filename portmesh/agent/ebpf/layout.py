"""The eBPF datapath's maps, as Python sees them: ctypes mirrors of ``datapath.h``, one per struct.

The C header is the source of the layout; this module repeats it field for field
so the agent can build keys and values without hand-packing bytes, and a test
compares each size with the BTF of the compiled object. Addresses and ports are
kept in network byte order (``be32``/``be16`` convert), as the program reads them
straight from the packet.
"""

from __future__ import annotations

import ctypes
import enum
import socket
from ipaddress import IPv4Address
from typing import TypeAlias

MAX_PORTS = 65536
MAX_MAPPINGS = 262144
MAX_BLOCKS = 65536
MAX_MACS = 131072
MAX_NETWORKS = 1024
MAX_PUBLIC_IPS = 65536
MAX_ECHO = 16384
MAX_SLOTS = 64
MAX_SLOT_ENTRIES = 131072
MAX_BACKENDS = 65536
MAX_POLICY = 65536
MAX_AFFINITY = 262144

CFG_GATEWAY = 1
DEST_LOCAL = 1
DEST_TUNNEL = 2
DEST_BALANCED = 4  # mappings entry: ifindex = slot count, owner = version of its slots/policy
DEST_FILTERED = 8
DEST_ALLOWLIST = 16
DEST_SERVING = 32  # backends entry
POLICY_ALLOW = 1
POLICY_DENY = 2
NET_POOL = 1
NET_PROTECTED = 2
NET_LINK_LOCAL = 3

ICMP_RATE = 1000  # ICMP errors per second the program sends at most (datapath.h PM_ICMP_RATE)
ICMP_BURST = 50  # ... after a quiet period (PM_ICMP_BURST)

IPPROTO_TCP = 6
IPPROTO_UDP = 17

Mac = ctypes.c_uint8 * 6


class DropReason(enum.IntEnum):
    """Index of the ``drops`` map: why the program dropped a frame (datapath.h ``pm_drop_reason``)."""

    UNKNOWN_PORT = 0
    SPOOF_MAC = 1
    SPOOF_IP = 2
    SPOOF_PORT = 3
    SPOOF_ARP = 4
    FENCE = 5
    NOT_IP = 6
    TUNNEL = 7
    ICMP = 8
    REFUSED = 9
    NO_ROUTE = 10
    TTL_EXCEEDED = 11  # answered with ICMP time exceeded
    TOO_BIG = 12  # answered with ICMP fragmentation needed
    ICMP_LIMIT = 13  # an ICMP error not sent: over the rate limit


DROP_MAX = len(DropReason)


def be32(ip: IPv4Address) -> int:
    """An IPv4 address as the ``__be32`` field holds it (network order in memory)."""
    return socket.htonl(int(ip))


def be16(port: int) -> int:
    """A port as the ``__be16`` field holds it."""
    return socket.htons(port)


def mac_bytes(mac: str) -> ctypes.Array[ctypes.c_uint8]:
    """``"0a:00:00:00:00:01"`` as the 6-byte array of a struct."""
    return Mac(*bytes.fromhex(mac.replace(":", "")))


def mac_text(mac: ctypes.Array[ctypes.c_uint8]) -> str:
    return ":".join(f"{b:02x}" for b in bytes(mac))


class Config(ctypes.Structure):
    """``struct pm_config``: the one entry of the ``config`` array."""

    _fields_ = [
        ("gateway_mac", Mac),
        ("virtual_mac", Mac),
        ("gateway_ip", ctypes.c_uint32),
        ("gateway_tunnel", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


class Port(ctypes.Structure):
    """``struct pm_port``: value of ``ports`` (key: the port's ifindex, ``ctypes.c_uint32``)."""

    _fields_ = [("mac", Mac), ("pad", ctypes.c_uint16), ("owner", ctypes.c_uint32)]


class OwnedIp(ctypes.Structure):
    """``struct pm_owned_ip``: key of ``owned_ips`` (value ``ctypes.c_uint8`` 1)."""

    _fields_ = [("ifindex", ctypes.c_uint32), ("ip", ctypes.c_uint32)]


class Dest(ctypes.Structure):
    """``struct pm_dest``: where a frame goes; value of ``mappings``, ``blocks``, ``macs`` and ``echo``."""

    _fields_ = [("mac", Mac), ("flags", ctypes.c_uint16), ("ifindex", ctypes.c_uint32), ("owner", ctypes.c_uint32)]


class MappingKey(ctypes.Structure):
    """``struct pm_mapping_key``: key of ``mappings`` and ``mapping_stats``."""

    _fields_ = [("ip", ctypes.c_uint32), ("port", ctypes.c_uint16), ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


class BlockKey(ctypes.Structure):
    """``struct pm_block_key``: key of the ``blocks`` LPM trie; prefixlen = 32 + (16 - log2(size))."""

    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("ip", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    ]


class MacKey(ctypes.Structure):
    """``struct pm_mac_key``: key of ``macs``."""

    _fields_ = [("mac", Mac), ("pad", ctypes.c_uint16)]


class NetKey(ctypes.Structure):
    """``struct pm_net_key``: key of the ``networks`` LPM trie (value ``ctypes.c_uint32`` kind)."""

    _fields_ = [("prefixlen", ctypes.c_uint32), ("ip", ctypes.c_uint32)]


class Counter(ctypes.Structure):
    """``struct pm_counter``: one CPU's slot in ``mapping_stats`` and ``drops``."""

    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class EchoKey(ctypes.Structure):
    """``struct pm_echo_key``: key of the ``echo`` LRU map."""

    _fields_ = [
        ("public_ip", ctypes.c_uint32),
        ("remote", ctypes.c_uint32),
        ("id", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    ]


class SlotKey(ctypes.Structure):
    """``struct pm_slot_key``: key of ``slots`` (value ``Dest``)."""

    _fields_ = [("mapping", MappingKey), ("version", ctypes.c_uint32), ("slot", ctypes.c_uint32)]


class BackendKey(ctypes.Structure):
    """``struct pm_backend_key``: key of ``backends`` (value ``Dest``, flags | ``DEST_SERVING``)."""

    _fields_ = [("mapping", MappingKey), ("mac", Mac), ("pad", ctypes.c_uint16)]


class PolicyKey(ctypes.Structure):
    """``struct pm_policy_key``: key of the ``policy`` LPM trie; prefixlen = 96 + the network's length."""

    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("mapping", MappingKey),
        ("version", ctypes.c_uint32),
        ("src", ctypes.c_uint32),
    ]


class AffinityKey(ctypes.Structure):
    """``struct pm_affinity_key``: key of the ``affinity`` LRU map (value ``Dest``)."""

    _fields_ = [
        ("saddr", ctypes.c_uint32),
        ("daddr", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class IcmpLimit(ctypes.Structure):
    """``struct pm_icmp_limit``: the one entry of ``icmp_limit``, the ICMP errors' token bucket."""

    _fields_ = [
        ("lock", ctypes.c_uint32),  # struct bpf_spin_lock
        ("tokens", ctypes.c_uint32),
        ("stamp", ctypes.c_uint64),
    ]


# The maps the agent fills, with their key and value types; ``public_ips`` and ``owned_ips`` hold 1.
CType: TypeAlias = "type[ctypes._SimpleCData[int]] | type[ctypes.Structure]"
MAPS: dict[str, tuple[CType, CType]] = {
    "config": (ctypes.c_uint32, Config),
    "ports": (ctypes.c_uint32, Port),
    "owned_ips": (OwnedIp, ctypes.c_uint8),
    "mappings": (MappingKey, Dest),
    "blocks": (BlockKey, Dest),
    "macs": (MacKey, Dest),
    "networks": (NetKey, ctypes.c_uint32),
    "public_ips": (ctypes.c_uint32, ctypes.c_uint32),
    "slots": (SlotKey, Dest),
    "backends": (BackendKey, Dest),
    "policy": (PolicyKey, ctypes.c_uint32),
}
# Maps the program writes and the agent reads (per-CPU counters) or leaves alone (echo).
STAT_MAPS = ("mapping_stats", "drops", "echo", "mapping_denied", "affinity", "icmp_limit")

# Structs whose size a test checks against the object's BTF (C name -> Python mirror).
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "pm_config": Config,
    "pm_port": Port,
    "pm_owned_ip": OwnedIp,
    "pm_dest": Dest,
    "pm_mapping_key": MappingKey,
    "pm_block_key": BlockKey,
    "pm_mac_key": MacKey,
    "pm_net_key": NetKey,
    "pm_counter": Counter,
    "pm_echo_key": EchoKey,
    "pm_slot_key": SlotKey,
    "pm_backend_key": BackendKey,
    "pm_policy_key": PolicyKey,
    "pm_affinity_key": AffinityKey,
    "pm_icmp_limit": IcmpLimit,
}
