"""Per-mapping allowed/denied packet and byte counters, read from the switches by the master.

Only filtered or balanced mappings are counted: their POLICY and BALANCE flows are theirs alone, so two
flow-stats requests per switch (table POLICY, table BALANCE) read them all, whatever the number of plain
mappings. Plain mappings (100,000 rewrites in MAPPING) stay uncounted: reading MAPPING every few seconds
would cost a full table read per switch. A packet passes POLICY/BALANCE only on the switch where it
entered the cloud (a tunnel delivers straight to the container), so the sum over switches counts each
packet once. Only changed counters are written (``StateReader.report_counters``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from portmesh.controller.balancing import Present, counted_flows, is_plain, mapping_flows
from portmesh.controller.flows import Flow
from portmesh.controller.pipeline import Table
from portmesh.model.entities import DesiredState, Mapping, MappingCounters, MappingKey

log = logging.getLogger(__name__)

COUNT_INTERVAL_S = 3.0
COUNTED_TABLES = (Table.POLICY, Table.BALANCE)


class CounterSink(Protocol):
    """The store's side (``StateReader.report_counters``; the master only)."""

    def report_counters(self, counters: dict[MappingKey, MappingCounters]) -> None: ...


Stats = Iterable[tuple[int, int, int]]  # (cookie, packets, bytes) of one flow on one switch


@dataclass
class CookieIndex:
    """Cookie -> (mapping key, allowed?) for the counted flows of the state's counted mappings.

    Those flows do not depend on the switch (only the allowances in CLASSIFY do, and they are not
    counted), so they are compiled once here with no ports; entries are kept per mapping object.
    """

    _by_mapping: dict[MappingKey, tuple[Mapping, dict[int, bool]]] = field(default_factory=dict)

    def update(self, state: DesiredState) -> dict[int, tuple[MappingKey, bool]]:
        kept: dict[MappingKey, tuple[Mapping, dict[int, bool]]] = {}
        out: dict[int, tuple[MappingKey, bool]] = {}
        for key, mapping in state.mappings.items():
            if is_plain(mapping) or not (mapping.filtered or mapping.balanced):
                continue
            hit = self._by_mapping.get(key)
            if hit is None or hit[0] is not mapping:
                hit = (mapping, cookies_of(list(mapping_flows(mapping, present(state, mapping)))))
            kept[key] = hit
            out.update((cookie, (key, allowed)) for cookie, allowed in hit[1].items())
        self._by_mapping = kept
        return out


def present(state: DesiredState, mapping: Mapping) -> list[Present]:
    """The mapping's existing backends, with no port (the counted flows do not depend on ports)."""
    down = mapping.down
    return [Present(state.containers[b.container], b.weight, b.container not in down, None)
            for b in mapping.backends if b.container in state.containers]


def cookies_of(flows: Sequence[Flow]) -> dict[int, bool]:
    allowed, denied = counted_flows(flows)
    return {**dict.fromkeys(allowed, True), **dict.fromkeys(denied, False)}


def totals(index: dict[int, tuple[MappingKey, bool]], stats: Iterable[Stats]) -> dict[MappingKey, MappingCounters]:
    """Sum the switches' flow stats into one MappingCounters per counted mapping (zeros included)."""
    sums: dict[MappingKey, list[int]] = {key: [0, 0, 0, 0] for key, _allowed in index.values()}
    for switch in stats:
        for cookie, packets, nbytes in switch:
            hit = index.get(cookie)
            if hit is None:
                continue
            s = sums[hit[0]]
            i = 0 if hit[1] else 2
            s[i] += packets
            s[i + 1] += nbytes
    return {key: MappingCounters(*s) for key, s in sums.items()}


async def read_stats(conn: Any) -> list[tuple[int, int, int]]:
    """(cookie, packets, bytes) of every flow in the counted tables of one switch."""
    from portmesh.controller.encoding import DP, parser

    out: list[tuple[int, int, int]] = []
    for table in COUNTED_TABLES:
        for reply in await conn.request(parser.OFPFlowStatsRequest(DP, table_id=table.number)):
            out.extend((s.cookie, s.packet_count, s.byte_count) for s in reply.body)
    return out


class CounterReporter:
    """The master's loop: every COUNT_INTERVAL_S read the switches, write the counters that changed."""

    def __init__(self, controller: Any, interval: float = COUNT_INTERVAL_S) -> None:
        self.controller = controller
        self.interval = interval
        self.index = CookieIndex()
        self.reported: dict[MappingKey, MappingCounters] = {}

    async def run(self) -> None:
        sink = self.controller.store
        if not hasattr(sink, "report_counters"):
            log.info("the store takes no counters: per-mapping counters are not reported")
            return
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.once(sink)
            except Exception as exc:  # best effort (a switch went away, the store refused): never stop syncing
                log.warning("reading or reporting mapping counters failed: %s", exc)

    async def once(self, sink: CounterSink) -> dict[MappingKey, MappingCounters]:
        """One round; returns what was written."""
        ctl = self.controller
        state = ctl.state
        if not ctl.master or state is None:
            return {}
        index = self.index.update(state)
        if not index:
            self.reported = {}
            return {}
        stats = [await read_stats(sw.conn) for sw in list(ctl.switches.values())]
        changed = {k: v for k, v in totals(index, stats).items() if self.reported.get(k) != v}
        if changed and ctl.master:
            await asyncio.to_thread(sink.report_counters, changed)
            self.reported.update(changed)
        return changed
