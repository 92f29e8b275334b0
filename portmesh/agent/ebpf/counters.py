"""An eBPF host's traffic report: per-mapping counters and drops per reason, from the maps to the store.

On an OVS host the master controller reads the switches' POLICY/BALANCE flow counters and writes
``Mapping.counters``; an eBPF host has no switch for it to read, so its agent reads ``mapping_stats``
(allowed: delivered through the mapping), ``mapping_denied`` (what the mapping's firewall dropped)
and ``drops`` (the program's drops per reason) and writes them into its own Host row
(``Store.report_traffic``). What the API shows of a mapping is the sum of both (``Store.mapping_counters``).
Each packet is counted once: the program counts it on the host where it entered the cloud (a
tunnel delivers straight to the container, uncounted), as a switch's POLICY/BALANCE flows do.

Only filtered or balanced mappings are reported, as on OVS: plain ones are not counted there, and
100,000 plain mappings must not become 100,000 store entries rewritten every few seconds. The
report is written only when it changed, so an idle host writes nothing.

Reading is blocking (a syscall per key): :class:`TrafficReporter.run` does it in a worker thread,
beside the converge loop, never in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from portmesh.agent.ebpf import sync
from portmesh.agent.ebpf.sync import MapLike
from portmesh.model.entities import DesiredState, MappingCounters, MappingKey

log = logging.getLogger(__name__)

REPORT_INTERVAL_S = 3.0  # as the master's CounterReporter (controller/counters.py)
REPORTED_MAPS = (sync.STATS, sync.DENIED, "drops")


class TrafficSink(Protocol):
    """The store's side (``Store.report_traffic``)."""

    def snapshot(self) -> DesiredState: ...

    def report_traffic(
        self, host: str, counters: Mapping[MappingKey, MappingCounters], drops: Mapping[str, int]
    ) -> bool: ...


def counted_keys(state: DesiredState) -> list[MappingKey]:
    """The mappings whose counters are reported: filtered or balanced ones (as OVS counts them)."""
    return [key for key, m in state.mappings.items() if m.filtered or m.balanced]


def read_mapping_counters(maps: Mapping[str, MapLike], keys: Iterable[MappingKey]) -> dict[MappingKey, MappingCounters]:
    """Each key's allowed and denied packets/bytes on this host, summed over the CPUs (zero where the
    map has no entry yet: the sync creates it with the mapping)."""
    out: dict[MappingKey, MappingCounters] = {}
    for key in keys:
        allowed = sync.read_counters(maps, key)
        denied = sync.read_denied(maps, key) if sync.DENIED in maps else (0, 0)
        out[key] = MappingCounters(allowed[0], allowed[1], denied[0], denied[1])
    return out


def read_drop_packets(maps: Mapping[str, MapLike]) -> dict[str, int]:
    """Packets the program dropped per reason (lower-case reason name), the reasons with none left out."""
    return {reason.name.lower(): packets for reason, (packets, _b) in sync.read_drops(maps).items() if packets}


class TrafficReporter:
    """Every ``interval`` seconds: read the maps, write the host's report if it changed."""

    def __init__(self, host: str, store: TrafficSink, maps: Callable[[], Mapping[str, MapLike]],
                 interval: float = REPORT_INTERVAL_S) -> None:
        self.host = host
        self.store = store
        self.maps = maps  # called each round: the loaded object may change under an agent's restart of it
        self.interval = interval
        self.reports = 0  # reports written (tests)
        # (generation, counted keys): finding them walks every mapping (75 ms at 100,000 plain ones on a
        # busy 2-core machine), so it is redone only when the desired state moved.
        self._counted: tuple[int, list[MappingKey]] = (-1, [])

    def once(self) -> bool:
        """One round (blocking); True if it wrote."""
        state = self.store.snapshot()
        if self.host not in state.hosts:
            return False  # not registered (yet): nowhere to write
        if self._counted[0] != state.generation:
            self._counted = (state.generation, counted_keys(state))
        maps = self.maps()
        counters = read_mapping_counters(maps, self._counted[1])
        wrote = self.store.report_traffic(self.host, counters, read_drop_packets(maps))
        self.reports += wrote
        return wrote

    async def run(self, stop: asyncio.Event) -> None:
        """Report until ``stop``; a failed round (store away, object being reloaded) is logged and the
        next one tries again: the counters are in the maps, nothing is lost by waiting."""
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.once)
            except Exception as exc:
                log.warning("reporting the eBPF counters failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)


def datapath_maps(map_of: Callable[[str], MapLike]) -> dict[str, MapLike]:
    """The maps the reporter reads, by name (``map_of``: e.g. ``EbpfDatapath.loaded.map``)."""
    return {name: map_of(name) for name in REPORTED_MAPS}
