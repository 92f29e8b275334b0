"""Desired state → the exact flow set of one switch. Pure: no I/O, no switch, no clock.

The controller calls :func:`compile_switch` for each connected switch and
installs the difference; tests call it directly. Flows are grouped by owner
(host, container, mapping) so that removing an owner removes precisely its
flows, and a change to one mapping touches only that mapping's flows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from collections.abc import Mapping as MappingABC
from functools import partial
from ipaddress import IPv4Address

from portmesh.controller.balancing import Present
from portmesh.controller.balancing import mapping_flows as special_mapping_flows
from portmesh.controller.flows import (
    OFPP_CONTROLLER,
    OFPP_LOCAL,
    Flow,
)
from portmesh.controller.rules import (
    allowance_flow,
    block_flows,
    container_port_flows,
    host_flows,
    public_ip_flows,
    rewrite_flow,
    tunnel_delivery_flow,
    tunnel_flows,
    uplink_flows,
)
from portmesh.model.config import NetworkConfig
from portmesh.model.entities import Container, DesiredState, Mapping, MappingKey, Proto
from portmesh.model.snapshots import changed_keys

__all__ = ["OFPP_CONTROLLER", "CommonFlows", "compile_switch"]


def compile_switch(
    state: DesiredState,
    config: NetworkConfig,
    host: str,
    ports: MappingABC[str, int],
) -> dict[int, Flow]:
    """All flows the switch of ``host`` must hold, keyed by cookie.

    ``ports`` maps bridge-port names to OpenFlow port numbers as the switch
    reports them; a local container whose port is not there yet gets no
    port-bound flows (its traffic is dropped until the port appears), a remote
    container whose host's tunnel port is not there gets no L2 flow.
    """
    return check_unique(SwitchCompiler(config, host).compile(state, ports).values())


# (mapping, owner MAC, owner's port here, flows); for a non-plain mapping the MAC and port parts are
# the tuples of every present backend's (name, MAC) and ports, which is what its flows depend on.
MappingEntry = tuple[Mapping, object, object, tuple[Flow, ...]]
ContainerInputs = tuple[Container, int | None, int | None]  # the container, its local port, the tunnel to its host


class CommonFlows:
    """The host-independent flows (mapping rewrites, reply blocks, public-IP flows), built once for all switches.

    Every switch holds the same rewrite for a mapping, so the switches' compilers
    share one instance: the first compiler to meet a changed mapping builds its
    flow and the others reuse that very object (memory and compile time grow with
    the mappings, not with hosts x mappings). The set of mappings that changed
    between two snapshots is likewise computed once. Entries are keyed by
    everything their flows depend on, so sharing never changes any output.
    """

    def __init__(self, config: NetworkConfig) -> None:
        self.config = config
        self._rewrites: dict[MappingKey, MappingEntry] = {}
        self._blocks: dict[tuple[str, str, tuple[IPv4Address, ...], object], tuple[Flow, ...]] = {}
        self._ips: dict[IPv4Address, tuple[Flow, ...]] = {}
        self._dirty: tuple[object, object, frozenset[MappingKey]] = (None, None, frozenset())

    def rewrite(self, mapping: Mapping, mac: str) -> MappingEntry:
        """The mapping's entry on a switch that is not its owner's: its rewrite flow alone. One entry
        object for every such switch (their caches hold the very same tuple, not a copy each)."""
        hit = self._rewrites.get(mapping.key)
        if hit is not None and hit[1] == mac and (hit[0] is mapping or hit[0] == mapping):
            return hit
        entry = self._rewrites[mapping.key] = (mapping, mac, None, (rewrite_flow(mapping, mac),))
        return entry

    def blocks(self, container: Container) -> tuple[Flow, ...]:
        """The container's reply-block flows."""
        key = (container.name, container.mac, container.ips, container.block)
        hit = self._blocks.get(key)
        if hit is None:
            hit = self._blocks[key] = tuple(block_flows(container))
        return hit

    def public_ip(self, ip: IPv4Address) -> tuple[Flow, ...]:
        """The flows of one public IP (ARP, echo, refusals, ICMP errors)."""
        hit = self._ips.get(ip)
        if hit is None:
            hit = self._ips[ip] = tuple(public_ip_flows(self.config, ip))
        return hit

    def dirty(self, prev: MappingABC[MappingKey, Mapping], new: MappingABC[MappingKey, Mapping]) -> set[MappingKey]:
        """Keys whose mapping differs (added, changed or gone) between two snapshots; one pass per pair."""
        if prev is new:  # the same snapshot (a port changed): no mapping did
            return set()
        if self._dirty[0] is prev and self._dirty[1] is new:
            return set(self._dirty[2])
        dirty = changed_keys(prev, new)
        self._dirty = (prev, new, frozenset(dirty))
        for key in dirty:
            if key not in new:
                self._rewrites.pop(key, None)  # gone (a switch still behind rebuilds it if it must)
        return dirty

    def prune(self, state: DesiredState) -> None:
        """Forget entries the state no longer has (called once per round, after every switch is synced).

        Removed mappings leave as they are seen (:meth:`dirty`); what a full compile left behind
        is swept only once it is a good part of the whole, so the sweep costs O(1) per change.
        """
        if len(self._rewrites) > len(state.mappings) * 5 // 4 + 1024:
            self._rewrites = {k: v for k, v in self._rewrites.items() if k in state.mappings}
        if len(self._blocks) > len(state.containers):
            live = {(c.name, c.mac, c.ips, c.block) for c in state.containers.values()}
            self._blocks = {k: v for k, v in self._blocks.items() if k in live}
        ips = state.public_ips()
        if len(self._ips) > len(ips):
            self._ips = {k: v for k, v in self._ips.items() if k in ips}


class SwitchCompiler:
    """:func:`compile_switch` with memory: each owner's flows are kept and rebuilt only when it changes.

    The output depends only on the inputs (the caches are keyed by everything an
    owner's flows depend on), so this is still a pure function of ``(state, ports)``;
    the memory is what makes one change among 100,000 mappings cost one owner's flows.
    Small owners (the host, each public IP, each container) are re-checked on every
    compile; mappings, the many, are re-checked only where the store handed over a
    different object or their container's inputs changed.
    """

    def __init__(self, config: NetworkConfig, host: str, common: CommonFlows | None = None) -> None:
        if common is not None and common.config != config:
            raise ValueError("the shared flows were built for another config")
        self.config = config
        self.host = host
        self.common = common if common is not None else CommonFlows(config)
        self._owners: dict[object, tuple[Flow, ...]] = {}
        self._container_inputs: dict[str, ContainerInputs] = {}
        self._mappings: dict[MappingKey, MappingEntry] = {}
        self._by_container: dict[str, set[MappingKey]] = {}
        self._prev_mappings: MappingABC[MappingKey, Mapping] = {}
        self._pending: dict[object, tuple[Flow, ...]] = {}
        self._pending_inputs: dict[str, ContainerInputs] = {}
        self._vanished: list[tuple[Flow, ...]] = []
        self._index: tuple[object, dict[IPv4Address, list[Container]], dict[int, Container]] = (None, {}, {})

    def owner_of(self, ip: IPv4Address, proto: Proto, port: int) -> Container | None:
        """Who owns ``(ip, proto, port)`` in the flows last compiled: a mapping's container, else the
        container holding ``ip`` whose port block has ``port``. For ICMP errors, which quote such a triple."""
        mapping = self._prev_mappings.get(MappingKey(ip, proto, port))
        if mapping is not None:
            entry = self._container_inputs.get(mapping.container)
            return entry[0] if entry is not None else None
        return next((c for c in self._indexes()[0].get(ip, ()) if port in c.block), None)

    def backends_of(self, ip: IPv4Address, proto: Proto, port: int) -> tuple[Container, ...]:
        """Every container that may own ``(ip, proto, port)``: all of a mapping's existing backends (with
        direct server return any of them sends from that port), else :meth:`owner_of`'s one, if any."""
        mapping = self._prev_mappings.get(MappingKey(ip, proto, port))
        if mapping is not None:
            inputs = self._container_inputs
            return tuple(entry[0] for entry in map(inputs.get, mapping.names) if entry is not None)
        owner = self.owner_of(ip, proto, port)
        return (owner,) if owner is not None else ()

    def container_at(self, port: int) -> Container | None:
        """The container whose bridge port is OpenFlow port ``port`` on this switch, as last compiled."""
        return self._indexes()[1].get(port)

    def _indexes(self) -> tuple[dict[IPv4Address, list[Container]], dict[int, Container]]:
        """IP -> holders and port -> container, rebuilt only after the containers changed."""
        inputs = self._container_inputs
        if self._index[0] is not inputs:
            by_ip: dict[IPv4Address, list[Container]] = {}
            by_port: dict[int, Container] = {}
            for container, port, _tunnel in inputs.values():
                for ip in container.ips:
                    by_ip.setdefault(ip, []).append(container)
                if port is not None and container.host == self.host:
                    by_port[port] = container
            self._index = (inputs, by_ip, by_port)
        return self._index[1], self._index[2]

    def compile(self, state: DesiredState, ports: MappingABC[str, int]) -> dict[int, Flow]:
        """The whole flow set, keyed by cookie."""
        return {flow.cookie: flow for flows in self.owners(state, ports) for flow in flows}

    def owners(self, state: DesiredState, ports: MappingABC[str, int]) -> Iterator[tuple[Flow, ...]]:
        """Each owner's flows in turn, so a caller can send while the rest is still being compiled.

        The caches are replaced only once the iteration completes; an abandoned
        iteration leaves the previous ones intact.
        """
        small = list(self._walk_small(state, ports))
        for flows, _previous in small:
            yield flows
        cache = self._mappings
        used: dict[MappingKey, MappingEntry] = {}
        by_container: dict[str, set[MappingKey]] = {}
        for key, mapping in state.mappings.items():
            backends = mapping.backends
            if len(backends) == 1:  # the common case, kept cheap: 100,000 of them
                by_container.setdefault(mapping.container, set()).add(key)
            else:
                for backend in backends:
                    by_container.setdefault(backend.container, set()).add(key)
            entry = self._entry(state, ports, key, mapping, cache.get(key))
            if entry is not None:
                used[key] = entry
                yield entry[3]
        self._commit_small(small)
        self._mappings, self._by_container, self._prev_mappings = used, by_container, state.mappings

    def delta(self, state: DesiredState, ports: MappingABC[str, int]) -> tuple[list[Flow], set[int]]:
        """What changed since the last completed compile: flows to add and cookies to delete.

        Only owners whose inputs changed are rebuilt and only their flows are
        returned. Valid only while the switch holds exactly the previous compile's
        output (the controller falls back to a full sync otherwise).
        """
        added: dict[int, Flow] = {}
        removed: set[int] = set()
        small = list(self._walk_small(state, ports))
        for flows, previous in small:
            if previous is not None:
                added.update((f.cookie, f) for f in flows)
                removed.update(f.cookie for f in previous)
        changed_owners = self._commit_small(small)
        for flows in self._vanished:
            removed.update(f.cookie for f in flows)

        prev, new = self._prev_mappings, state.mappings
        dirty = self.common.dirty(prev, new)
        for name in changed_owners:
            dirty.update(self._by_container.get(name, ()))
        cache, by_container = self._mappings, self._by_container
        for key in dirty:
            old = cache.pop(key, None)
            if old is not None:
                removed.update(f.cookie for f in old[3])
                for name in old[0].names:
                    by_container.get(name, set()).discard(key)
            mapping = new.get(key)
            if mapping is None:
                continue
            for name in mapping.names:
                by_container.setdefault(name, set()).add(key)
            entry = self._entry(state, ports, key, mapping, old)
            if entry is not None:
                cache[key] = entry
                added.update((f.cookie, f) for f in entry[3])
        self._prev_mappings = new
        unchanged = removed & added.keys()
        return [f for c, f in added.items() if c not in unchanged], removed - unchanged

    def _entry(
        self, state: DesiredState, ports: MappingABC[str, int], key: MappingKey, mapping: Mapping, old: MappingEntry | None
    ) -> MappingEntry | None:
        """A mapping's cache entry: the old one if its inputs are unchanged, else rebuilt."""
        # is_plain(), inlined: this runs for each of 100,000 mappings in a full compile.
        if mapping.allow or mapping.deny or mapping.down or len(mapping.backends) > 1:
            return self._special_entry(state, ports, mapping, old)
        owner = state.containers.get(mapping.container)
        if owner is None:
            return None
        port = ports.get(owner.port_name) if owner.host == self.host else None
        # Identity first: an incremental store hands back the very same objects for unchanged rows.
        if old is not None and (old[0] is mapping or old[0] == mapping) and old[1] == owner.mac and old[2] == port:
            return old
        shared = self.common.rewrite(mapping, owner.mac)
        if port is None:
            return shared
        rewrite = shared[3][0]
        return (mapping, owner.mac, port, (rewrite, allowance_flow(mapping, owner, port, rewrite)))

    def _special_entry(
        self, state: DesiredState, ports: MappingABC[str, int], mapping: Mapping, old: MappingEntry | None
    ) -> MappingEntry | None:
        """The entry of a balanced or filtered mapping (see :mod:`portmesh.controller.balancing`)."""
        containers, host = state.containers, self.host
        present = [(b, containers[b.container]) for b in mapping.backends if b.container in containers]
        if not present:
            return None
        macs = tuple((c.name, c.mac) for _b, c in present)
        here = tuple(ports.get(c.port_name) if c.host == host else None for _b, c in present)
        if old is not None and (old[0] is mapping or old[0] == mapping) and old[1] == macs and old[2] == here:
            return old
        down = mapping.down
        backends = [Present(c, b.weight, b.container not in down, port) for (b, c), port in zip(present, here, strict=True)]
        return (mapping, macs, here, tuple(special_mapping_flows(mapping, backends)))

    def _walk_small(
        self, state: DesiredState, ports: MappingABC[str, int]
    ) -> Iterator[tuple[tuple[Flow, ...], tuple[Flow, ...] | None]]:
        """Host, tunnel, public-IP and container owners: their flows and, if (re)built, the flows they
        had before (``()`` if none), else None.

        Containers are keyed by name and checked against their last inputs, identity first:
        hashing a Container (a dataclass of tuples of addresses) for each of hundreds of
        containers on every change of every switch cost more than the change itself.
        """
        cached, common = self._owners, self.common
        config, host = self.config, self.host
        self._pending, self._pending_inputs = {}, {}
        pending, pending_inputs = self._pending, self._pending_inputs
        # Other hosts' tunnel ports on this switch (a tunnel the agent has not made yet is simply absent).
        tunnels = {h.name: ports.get(h.tunnel_port) for h in state.hosts.values() if h.name != host}
        gateway = state.gateway_for(host)
        is_gateway = gateway in (None, host)
        gateway_out = OFPP_LOCAL if is_gateway else tunnels.get(gateway or host)
        tunnel_ports = tuple(sorted(p for p in tunnels.values() if p is not None))
        # The uplink the agent reported (--uplink), once the switch has it as a port.
        me = state.hosts.get(host)
        uplink = ports.get(me.uplink) if me is not None and me.uplink else None
        keys: list[tuple[object, Callable[[], Iterable[Flow]]]] = [
            (("host", host, gateway_out), partial(host_flows, config, host, gateway_out)),
            (("tunnels", host, tunnel_ports, is_gateway), partial(tunnel_flows, config, host, tunnel_ports, is_gateway)),
            *((("ip", ip), partial(common.public_ip, ip)) for ip in state.public_ips()),
        ]
        if uplink is not None:
            keys.append((("uplink", host, uplink), partial(uplink_flows, config, host, uplink)))
        for key, build in keys:
            hit = cached.get(key)
            flows = hit if hit is not None else tuple(build())
            pending[key] = flows
            yield flows, (None if hit is not None else ())
        last = self._container_inputs
        for c in state.containers.values():
            name = c.name
            local = c.host == host
            port = ports.get(c.port_name) if local else None
            tunnel = None if local else tunnels.get(c.host)
            key = ("container", name)
            old = last.get(name)
            before = cached.get(key)
            if before is not None and old is not None and (old[0] is c or old[0] == c) and old[1:] == (port, tunnel):
                pending[key], pending_inputs[name] = before, old
                yield before, None
                continue
            flows = tuple(container_flows(c, port, tunnel, common))
            pending[key], pending_inputs[name] = flows, (c, port, tunnel)
            yield flows, (before or ())

    def _commit_small(self, small: list[tuple[tuple[Flow, ...], tuple[Flow, ...] | None]]) -> set[str]:
        """Adopt the small owners just walked; returns the containers whose inputs changed or vanished."""
        used, inputs = self._pending, self._pending_inputs
        self._pending, self._pending_inputs = {}, {}
        self._vanished = [flows for key, flows in self._owners.items() if key not in used]
        last = self._container_inputs
        changed = {name for name, old in last.items() if inputs.get(name) is not old}
        changed.update(inputs.keys() - last.keys())
        self._owners, self._container_inputs = used, inputs
        return changed


def check_unique(flows: Iterable[Flow]) -> dict[int, Flow]:
    """Key by cookie; two different flows on the same (table, priority, match) are a compiler bug."""
    out: dict[int, Flow] = {}
    seen: dict[tuple[int, int, object], int] = {}
    for f in flows:
        key = (f.table.value.number, f.priority, f.match)
        other = seen.setdefault(key, f.cookie)
        if other != f.cookie:
            raise ValueError(f"two flows share table/priority/match: {out[other]} and {f}")
        out[f.cookie] = f
    return out


def container_flows(
    container: Container, port: int | None, tunnel: int | None = None, common: CommonFlows | None = None
) -> Iterator[Flow]:
    """A container's flows: its reply block on every switch, port security and delivery on its own,
    and on another host's switch delivery into the tunnel to its host (``tunnel``, when that port exists)."""
    yield from (common.blocks(container) if common is not None else block_flows(container))
    if port is not None:
        yield from container_port_flows(container, port)
    if tunnel is not None:
        yield tunnel_delivery_flow(container, tunnel)
