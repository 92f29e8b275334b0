"""Desired state -> the eBPF datapath's map entries on one host. Pure: no I/O, no clock.

The sibling of the OVS flow compiler (``portmesh/controller/compiler.py``): the same
desired state, the same decisions (who owns which port, where a container is reached,
what is fenced), written as map entries (``datapath.h``) instead of flows. The agent
may not import the controller, so what both need is derived here from the model alone.

Entries are the C structs' bytes. They are packed with :mod:`struct` rather than by
building ``layout`` ctypes objects (five times cheaper, and 100,000 mappings make it
matter); a unit test proves each packer gives exactly ``bytes(layout.X(...))``.

:class:`MapCompiler` remembers its last output and rebuilds only what changed (the
mappings whose object or whose owner's destination changed), as the OVS compiler's
caches do: one changed mapping among 100,000 costs a dict copy, not a recompile. Its
output depends only on its inputs. A returned dict is never mutated afterwards (a
later compile copies it), so a caller may keep it and compare it by identity.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from portmesh.agent.ebpf import layout
from portmesh.model.config import NetworkConfig
from portmesh.model.entities import Container, DesiredState, Mapping, MappingKey, Proto, tunnel_port_for
from portmesh.model.slots import slots
from portmesh.model.snapshots import changed_keys

LINK_LOCAL = IPv4Network("169.254.0.0/16")
IPPROTO = {Proto.TCP: layout.IPPROTO_TCP, Proto.UDP: layout.IPPROTO_UDP}
ONE_U8 = b"\x01"
ONE_U32 = struct.pack("=I", 1)
_U32 = struct.Struct("=I")
_DEST = struct.Struct("=6sHII")  # struct pm_dest
_PORT = struct.Struct("=6sHI")  # struct pm_port
_CONFIG = struct.Struct("=6s6s4sII")  # struct pm_config (gateway_ip as the packet has it)
_MAPPING_KEY = struct.Struct(">IHBx")  # struct pm_mapping_key: ip, port in network order; proto; pad
# (config, gateway host, tunnel to it, containers, their destinations): what the small maps depend on.
SmallInputs = tuple[NetworkConfig, str | None, int, tuple[Container, ...], tuple[bytes | None, ...]]
# A change touching more than this share of the mappings is compiled afresh (the walk gives up).
FULL_SHARE = 4


@dataclass(frozen=True)
class Compiled:
    """Every map's wanted content on one host, plus what the sync and the operator need besides.

    ``maps``: one dict per name in ``layout.MAPS`` (key bytes -> value bytes).
    ``stat_keys``: ``mapping_stats`` keys that must exist: every mapping this datapath serves,
    installed or waiting for its owner's port, so a port that comes and goes keeps its counters.
    ``unsupported``: mappings not installed here and why, in key order.
    ``denied_keys``: ``mapping_denied`` keys that must exist: every filtered mapping's.
    """

    maps: dict[str, dict[bytes, bytes]]
    stat_keys: frozenset[bytes]
    unsupported: tuple[tuple[MappingKey, str], ...]
    denied_keys: frozenset[bytes] = frozenset()


# -- packers (each equals bytes(layout.X(...)); test_ebpf_compile checks) ------------------


def mac6(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def mapping_key(key: MappingKey) -> bytes:
    """``struct pm_mapping_key``: ip and port in network order, proto, pad."""
    return _MAPPING_KEY.pack(int(key.public_ip), key.port, layout.IPPROTO_TCP if key.proto is Proto.TCP else layout.IPPROTO_UDP)


def dest(mac: str, flags: int, ifindex: int, owner: int) -> bytes:
    """``struct pm_dest``."""
    return _DEST.pack(mac6(mac), flags, ifindex, owner)


def block_key(ip: IPv4Address, start: int, size: int) -> bytes:
    """``struct pm_block_key`` of a block: prefix = the 32 address bits + the port bits the block fixes."""
    if size <= 0 or size & (size - 1) or start % size:
        raise ValueError(f"port block {start}/{size} is not an aligned power of two")
    return _U32.pack(32 + 16 - (size.bit_length() - 1)) + ip.packed + start.to_bytes(2, "big") + b"\0\0"


def net_key(net: IPv4Network) -> bytes:
    """``struct pm_net_key`` (the address bits past the prefix are zero: an LPM trie keeps them)."""
    return _U32.pack(net.prefixlen) + net.network_address.packed


def owned_ip_key(ifindex: int, ip: IPv4Address) -> bytes:
    return _U32.pack(ifindex) + ip.packed


def port_value(mac: str, ifindex: int) -> bytes:
    """``struct pm_port``: the owner id is the port's ifindex."""
    return _PORT.pack(mac6(mac), 0, ifindex)


def config_value(gateway_mac: str, virtual_mac: str, gateway_ip: IPv4Address, tunnel: int, flags: int) -> bytes:
    return _CONFIG.pack(mac6(gateway_mac), mac6(virtual_mac), gateway_ip.packed, tunnel, flags)


def unsupported_reason(mapping: Mapping) -> str | None:
    """Why this version's datapath does not serve ``mapping``, or None: since issue 15's eBPF part
    (balancing, firewall, health) every mapping is served; kept for the agent's report."""
    return None


def is_plain(mapping: Mapping) -> bool:
    """One serving backend and no policy: a ``mappings`` entry that is the destination itself (as the
    OVS compiler's ``is_plain``; a health check alone, while up, changes nothing)."""
    return not (mapping.allow or mapping.deny or mapping.down or len(mapping.backends) > 1)


@dataclass(frozen=True)
class Special:
    """The entries of a mapping that is more than a rewrite (datapath.h ``PM_DEST_BALANCED``)."""

    entry_key: bytes  # its ``mappings`` key
    entry: bytes  # its ``mappings`` value
    slots: dict[bytes, bytes]
    backends: dict[bytes, bytes]
    policy: dict[bytes, bytes]


def _with_flags(where: bytes, flags: int) -> bytes:
    mac, old, ifindex, owner = _DEST.unpack(where)
    return _DEST.pack(mac, old | flags, ifindex, owner)


def policy_actions(mapping: Mapping) -> list[tuple[IPv4Network, int]]:
    """The policy trie's networks and actions, resolved here so one longest-prefix lookup answers:
    a deny network denies; an allow network inside (or equal to) a deny network denies too (deny
    always wins); any other allow network allows. Nested CIDRs are the only overlaps there are."""
    out = {net: layout.POLICY_DENY if any(net.subnet_of(d) for d in mapping.deny) else layout.POLICY_ALLOW
           for net in mapping.allow}  # fmt: skip
    out.update((net, layout.POLICY_DENY) for net in mapping.deny)
    return sorted(out.items(), key=lambda item: (item[0].prefixlen, int(item[0].network_address)))


def special_entries(mapping: Mapping, kb: bytes, dests: MappingABC[str, bytes | None]) -> Special:
    """Slots (the serving backends reachable from here, weight-expanded as the OVS side does), every
    reachable backend (SERVING or not), the resolved policy, and the entry naming their version.

    The version is a hash of that content: any change gives new slot and policy keys, written
    before the entry that names them and deleted after it (the sync's order), so a host never
    holds a mix of old and new rules."""
    serving = {b.container for b in mapping.serving()}
    backends: dict[bytes, bytes] = {}
    for b in mapping.backends:
        where = dests.get(b.container)
        if where is not None:
            backends[kb + where[:6] + b"\0\0"] = _with_flags(where, layout.DEST_SERVING if b.container in serving else 0)
    chosen = slots([(b.container, b.weight) for b in mapping.serving() if dests.get(b.container) is not None])
    actions = policy_actions(mapping)
    flags = layout.DEST_BALANCED
    if mapping.allow or mapping.deny:
        flags |= layout.DEST_FILTERED
    if mapping.allow:
        flags |= layout.DEST_ALLOWLIST
    targets = [dests[name] or b"" for name in chosen]
    digest = zlib.crc32(kb + _U32.pack(flags) + b"".join(targets))
    digest = zlib.crc32(b"".join(net_key(net) + _U32.pack(a) for net, a in actions), digest)
    version = _U32.pack(digest)
    slot_map = {kb + version + _U32.pack(i): where for i, where in enumerate(targets)}
    policy = {_U32.pack(96 + net.prefixlen) + kb + version + net.network_address.packed: _U32.pack(a)
              for net, a in actions}  # fmt: skip
    return Special(kb, _DEST.pack(bytes(6), flags, len(chosen), digest), slot_map, backends, policy)


# -- the compiler --------------------------------------------------------------------------


class MapCompiler:
    """:func:`compile_host` with memory, for one host."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._small: SmallInputs | None = None  # what the small maps were last built from
        self._small_maps: dict[str, dict[bytes, bytes]] = {}
        self._dests: dict[str, bytes | None] = {}  # container name -> where it is reached (None: nowhere yet)
        self._mappings: MappingABC[MappingKey, Mapping] = {}
        self._out: dict[bytes, bytes] = {}
        self._stats: frozenset[bytes] = frozenset()
        self._unsupported: dict[MappingKey, str] = {}
        self._unsupported_tuple: tuple[tuple[MappingKey, str], ...] = ()
        self._by_owner: dict[str, set[MappingKey]] = {}  # container -> mappings naming it as a backend
        self._special: dict[MappingKey, Special] = {}
        self._special_maps: dict[str, dict[bytes, bytes]] = {"slots": {}, "backends": {}, "policy": {}}
        self._denied: frozenset[bytes] = frozenset()

    def compile(self, state: DesiredState, ifindex: MappingABC[str, int]) -> Compiled:
        dests = self._container_dests(state, ifindex)
        maps = dict(self._small_entries(state, ifindex, dests))
        self._mapping_entries(state.mappings, dests)
        maps["mappings"] = self._out
        maps.update(self._special_maps)
        return Compiled(maps, self._stats, self._unsupported_tuple, self._denied)

    def _container_dests(self, state: DesiredState, ifindex: MappingABC[str, int]) -> dict[str, bytes | None]:
        """Where each container is reached from this host: its port here (LOCAL), the tunnel to its host
        (TUNNEL), or None while that device is missing."""
        out: dict[str, bytes | None] = {}
        host = self.host
        for name, c in state.containers.items():
            if c.host == host:
                port = ifindex.get(c.port_name)
                out[name] = None if port is None else dest(c.mac, layout.DEST_LOCAL, port, port)
            else:
                tunnel = ifindex.get(tunnel_port_for(c.host))
                out[name] = None if tunnel is None else dest(c.mac, layout.DEST_TUNNEL, tunnel, 0)
        return out

    def _small_entries(
        self, state: DesiredState, ifindex: MappingABC[str, int], dests: dict[str, bytes | None]
    ) -> dict[str, dict[bytes, bytes]]:
        """config, ports, owned_ips, blocks, macs, networks, public_ips: rebuilt only when their inputs change
        (the same dict objects are handed out again otherwise)."""
        gateway = state.gateway_for(self.host)
        tunnel = 0
        if gateway not in (None, self.host):
            tunnel = ifindex.get(state.hosts[gateway].tunnel_port, 0) if gateway in state.hosts else 0
        containers = tuple(state.containers.values())
        inputs = (state.config, gateway, tunnel, containers, tuple(dests.values()))
        previous = self._small
        if previous is not None and previous[0] == inputs[0] and previous[1:3] == inputs[1:3] \
                and len(previous[3]) == len(containers) and all(map(_same, previous[3], containers)) \
                and previous[4] == inputs[4]:  # fmt: skip
            return self._small_maps  # the same objects: identity first, a few hundred containers each time
        cfg = state.config
        flags = layout.CFG_GATEWAY if gateway in (None, self.host) else 0
        config = {_U32.pack(0): config_value(cfg.gateway_mac, cfg.virtual_mac, cfg.gateway_ip, tunnel, flags)}
        ports: dict[bytes, bytes] = {}
        owned: dict[bytes, bytes] = {}
        blocks: dict[bytes, bytes] = {}
        macs: dict[bytes, bytes] = {}
        public: dict[bytes, bytes] = {}
        for c in containers:
            for ip in c.ips:
                public[ip.packed] = ONE_U32
            where = dests[c.name]
            if where is None:
                continue
            macs[mac6(c.mac) + b"\0\0"] = where
            for ip in c.ips:
                blocks[block_key(ip, c.block.start, c.block.size)] = where
            if c.host == self.host:
                port = ifindex[c.port_name]
                ports[_U32.pack(port)] = port_value(c.mac, port)
                for ip in c.ips:
                    owned[owned_ip_key(port, ip)] = ONE_U8
        # Later writes win on an equal key: a protected network is never shadowed by a pool.
        networks = {net_key(p): _U32.pack(layout.NET_POOL) for p in cfg.public_pools}
        networks[net_key(LINK_LOCAL)] = _U32.pack(layout.NET_LINK_LOCAL)
        networks.update((net_key(p), _U32.pack(layout.NET_PROTECTED)) for p in cfg.protected_networks)
        maps = {"config": config, "ports": ports, "owned_ips": owned, "blocks": blocks, "macs": macs,
                "networks": networks, "public_ips": public}  # fmt: skip
        # Keep the old dict object where the content is equal: the sync skips a map it already holds.
        for name, entries in maps.items():
            old = self._small_maps.get(name)
            if old is not None and old == entries:
                maps[name] = old
        self._small, self._small_maps = inputs, maps
        return maps

    def _mapping_entries(self, mappings: MappingABC[MappingKey, Mapping], dests: dict[str, bytes | None]) -> None:
        """Bring ``_out``, ``_stats`` and ``_unsupported`` up to ``mappings``: only the changed keys if the
        previous compile is a good base, else afresh."""
        moved = {name for name, d in dests.items() if self._dests.get(name, b"") != d}
        moved.update(self._dests.keys() - dests.keys())
        self._dests = dests
        prev, limit = self._mappings, len(mappings) // FULL_SHARE + 1
        # Nothing compiled yet (prev empty): every key would be new, compile afresh.
        dirty = changed_keys(prev, mappings, limit) if prev or prev is mappings else None
        if dirty is not None:
            for name in moved:
                dirty.update(self._by_owner.get(name, ()))
        if dirty is None or len(dirty) > limit:
            self._full(mappings, dests)
        elif dirty:
            self._update(mappings, dests, dirty)
        self._mappings = mappings

    def _set_special(self, special: dict[MappingKey, Special]) -> None:
        """Rebuild slots/backends/policy and the denied keys from the special mappings (few: a handful
        per service, against 100,000 plain ones), keeping the old dict objects where equal."""
        self._special = special
        maps: dict[str, dict[bytes, bytes]] = {"slots": {}, "backends": {}, "policy": {}}
        denied: list[bytes] = []
        for sp in special.values():
            maps["slots"].update(sp.slots)
            maps["backends"].update(sp.backends)
            maps["policy"].update(sp.policy)
            if _DEST.unpack(sp.entry)[1] & layout.DEST_FILTERED:
                denied.append(sp.entry_key)
        for name, entries in maps.items():
            if self._special_maps.get(name) == entries:
                maps[name] = self._special_maps[name]
        self._special_maps = maps
        if frozenset(denied) != self._denied:
            self._denied = frozenset(denied)

    def _full(self, mappings: MappingABC[MappingKey, Mapping], dests: dict[str, bytes | None]) -> None:
        out: dict[bytes, bytes] = {}
        stats: list[bytes] = []
        unsupported: dict[MappingKey, str] = {}
        by_owner: dict[str, set[MappingKey]] = {}
        special: dict[MappingKey, Special] = {}
        get_dest = dests.get
        for key, m in mappings.items():
            # is_plain(), inlined for the common case: this runs for each of 100,000 mappings.
            if m.allow or m.deny or m.down or len(m.backends) > 1:
                sp = self._special_one(key, m, dests, by_owner)
                if sp is not None:
                    special[key] = sp
                    stats.append(sp.entry_key)
                    out[sp.entry_key] = sp.entry
                continue
            owner = m.container
            by_owner.setdefault(owner, set()).add(key)
            if owner not in dests:
                continue
            kb = mapping_key(key)
            stats.append(kb)
            where = get_dest(owner)
            if where is not None:
                out[kb] = where
        self._out, self._stats, self._by_owner = out, frozenset(stats), by_owner
        self._set_unsupported(unsupported)
        self._set_special(special)

    @staticmethod
    def _special_one(key: MappingKey, m: Mapping, dests: MappingABC[str, bytes | None],
                     by_owner: dict[str, set[MappingKey]]) -> Special | None:
        """A special mapping's entries (None if none of its backends exists), registered under every
        backend, as any backend's move changes them."""
        for name in m.names:
            by_owner.setdefault(name, set()).add(key)
        if not any(name in dests for name in m.names):
            return None
        return special_entries(m, mapping_key(key), dests)

    def _update(self, mappings: MappingABC[MappingKey, Mapping], dests: dict[str, bytes | None], dirty: set[MappingKey]) -> None:
        out = dict(self._out)
        stats_gone: set[bytes] = set()
        stats_new: set[bytes] = set()
        unsupported = dict(self._unsupported)
        by_owner = self._by_owner
        special = dict(self._special)
        for key in dirty:
            kb = mapping_key(key)
            out.pop(kb, None)
            stats_gone.add(kb)
            unsupported.pop(key, None)
            special.pop(key, None)
            old = self._mappings.get(key)
            if old is not None:
                for name in old.names:
                    by_owner.get(name, set()).discard(key)
            m = mappings.get(key)
            if m is None:
                continue
            why = unsupported_reason(m)
            if why is not None:
                unsupported[key] = why
                continue
            if not is_plain(m):
                sp = self._special_one(key, m, dests, by_owner)
                if sp is not None:
                    special[key] = sp
                    stats_new.add(kb)
                    out[kb] = sp.entry
                continue
            by_owner.setdefault(m.container, set()).add(key)
            if m.container not in dests:
                continue
            stats_new.add(kb)
            where = dests[m.container]
            if where is not None:
                out[kb] = where
        self._out = out
        stats_gone -= stats_new
        stats_new -= self._stats
        if stats_new or not stats_gone.isdisjoint(self._stats):  # a copy of 100,000 keys only if the set changed
            self._stats = (self._stats - stats_gone) | stats_new
        if unsupported != self._unsupported:
            self._set_unsupported(unsupported)
        if special != self._special:
            self._set_special(special)

    def _set_unsupported(self, unsupported: dict[MappingKey, str]) -> None:
        self._unsupported = unsupported
        self._unsupported_tuple = tuple(sorted(unsupported.items()))


def _same(a: Container, b: Container) -> bool:
    return a is b or a == b


_compilers: dict[str, MapCompiler] = {}
_lock = threading.Lock()


def compile_host(state: DesiredState, host: str, ifindex: MappingABC[str, int]) -> Compiled:
    """Every map entry ``host`` needs for ``state``, given its devices' ifindexes (container ports by
    ``Container.port_name``, tunnels by ``Host.tunnel_port``). A container whose device is missing gets
    nothing that leads to it (its traffic waits, as on an OVS switch). Remembers one
    :class:`MapCompiler` per host, so the agent's next compile costs only what changed."""
    with _lock:
        compiler = _compilers.get(host)
        if compiler is None:
            compiler = _compilers[host] = MapCompiler(host)
        return compiler.compile(state, ifindex)
