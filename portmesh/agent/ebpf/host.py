"""One host's eBPF datapath as the agent drives it: the object loaded, the programs on the ports, the maps synced.

It stands where the OVS bridge stands on an OVS host, with the same port verbs the
agent already uses for br0 (``ensure_port``, ``reattach_ports``, ``remove_port``...):
a "port" here is a device with the datapath's tc program at its ingress. Which
program a device gets follows from its name: a container port's host end gets
``pm_from_container``, a tunnel device (``vx-<host>``) ``pm_from_tunnel``, and the
uplink named by ``--uplink`` ``pm_from_uplink``. The maps are the flows' equivalent:
:meth:`EbpfDatapath.sync` compiles the desired state (compile.py) and writes the
difference (sync.py), after which the agent reports the generation as the host's
switch generation, as the controller does for an OVS switch.

The object is loaded once per agent process with its maps pinned by name under
``pin_dir``: a restarted agent reloads the object, finds the pinned maps with their
entries, re-attaches (replacing the old program with the new, no window) and writes
nothing when the state is unchanged, so traffic never stops.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from pyroute2 import IPRoute

from portmesh.agent.ebpf import build, compile, loader, sync
from portmesh.model.entities import DesiredState, MappingKey, is_tunnel_port

log = logging.getLogger("portmesh.agent.ebpf")

CONTAINER_PROGRAM = "pm_from_container"
TUNNEL_PROGRAM = "pm_from_tunnel"
UPLINK_PROGRAM = "pm_from_uplink"
DEFAULT_PIN_DIR = Path("/sys/fs/bpf/portmesh")


class EbpfDatapath:
    """The datapath of this host (the agent runs in the host's network namespace)."""

    def __init__(self, pin_dir: Path = DEFAULT_PIN_DIR, uplink: str | None = None, cache_dir: Path | None = None) -> None:
        self.pin_dir = pin_dir
        self.uplink = uplink
        self.cache_dir = cache_dir
        self._loaded: loader.Loaded | None = None
        self._sync = sync.MapSync()
        self.unsupported: tuple[tuple[MappingKey, str], ...] = ()

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Build (or reuse) the object, mount bpffs, load it, reusing the pinned maps."""
        obj = build.object_path(self.cache_dir)
        loader.ensure_bpffs(self.pin_dir)
        self._loaded = loader.load(obj, self.pin_dir)
        if self._loaded.replaced:
            # Another version pinned these with another definition: they start empty (the next pass
            # refills state maps from the store; counters restart at zero).
            log.warning("eBPF maps pinned with another definition, created afresh: %s", ", ".join(self._loaded.replaced))
            self._sync.forget()
        log.info("eBPF datapath %s loaded, maps pinned in %s", obj.name, self.pin_dir)

    def close(self) -> None:
        """Let go of the object: programs stay attached and maps stay pinned (traffic keeps flowing)."""
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None

    @property
    def loaded(self) -> loader.Loaded:
        if self._loaded is None:
            raise RuntimeError("the eBPF datapath is not loaded (start() first)")
        return self._loaded

    # -- ports (the verbs of agent.bridge.Bridge) -------------------------------------

    def program_for(self, name: str) -> str:
        """Which program a device gets at ingress, by its name."""
        if name == self.uplink:
            return UPLINK_PROGRAM
        if is_tunnel_port(name):
            return TUNNEL_PROGRAM
        return CONTAINER_PROGRAM

    def ensure(self) -> bool:
        """The uplink's program (if this host has an uplink); True if anything changed."""
        return self.ensure_port(self.uplink) if self.uplink else False

    def ports(self) -> set[str]:
        """Devices with one of this datapath's programs at ingress."""
        ours = {loader.program_id(self.loaded.program_fd(p)) for p in (CONTAINER_PROGRAM, TUNNEL_PROGRAM, UPLINK_PROGRAM)}
        found = set()
        with IPRoute() as ipr:
            for link in ipr.get_links():
                if loader.attached(link["index"]) in ours:
                    found.add(str(link.get_attr("IFLA_IFNAME")))
        return found

    def has_port(self, name: str) -> bool:
        index = _ifindex(name)
        if index is None:
            return False
        want = loader.program_id(self.loaded.program_fd(self.program_for(name)))
        return loader.attached(index) == want

    def ensure_port(self, name: str) -> bool:
        """Attach the right program to ``name``; True if it changed; False (logged) if the device is not there."""
        index = _ifindex(name)
        if index is None:
            log.warning("no device %s to attach the datapath to (yet)", name)
            return False
        return loader.attach(index, self.loaded.program_fd(self.program_for(name)), self.program_for(name))

    def ensure_ports(self, names: list[str]) -> list[str]:
        return [n for n in dict.fromkeys(names) if self.ensure_port(n)]

    def reattach_ports(self, names: list[str]) -> list[str]:
        """A device re-made under the same name is a new device: attaching is by ifindex, so just attach."""
        return self.ensure_ports(names)

    def remove_port(self, name: str) -> bool:
        index = _ifindex(name)
        return index is not None and loader.detach(index)

    # -- maps -------------------------------------------------------------------------

    def sync(self, state: DesiredState, host: str) -> sync.SyncStats:
        """Compile the state for this host and write the difference into the maps."""
        compiled = compile.compile_host(state, host, _ifindexes())
        if compiled.unsupported != self.unsupported:
            for key, why in compiled.unsupported:
                log.warning("mapping %s is not served by the eBPF datapath: %s", key, why)
            self.unsupported = compiled.unsupported
        maps = {name: self.loaded.map(name) for name in (*compiled.maps, sync.STATS, sync.DENIED)}
        return self._sync.apply(maps, compiled)

    def counters(self, key: MappingKey) -> tuple[int, int]:
        """(packets, bytes) delivered through the mapping on this host."""
        return sync.read_counters({"mapping_stats": self.loaded.map("mapping_stats")}, key)

    def denied(self, key: MappingKey) -> tuple[int, int]:
        """(packets, bytes) the mapping's firewall dropped on this host."""
        return sync.read_denied({sync.DENIED: self.loaded.map(sync.DENIED)}, key)


def _ifindex(name: str) -> int | None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _ifindexes() -> Mapping[str, int]:
    """Every device of the host's namespace by name (what compile_host needs of the host)."""
    with IPRoute() as ipr:
        return {str(link.get_attr("IFLA_IFNAME")): int(link["index"]) for link in ipr.get_links()}
