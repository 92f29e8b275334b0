"""Per-switch desired/installed bookkeeping and the bundle that closes the gap.

On connect the switch's flows are read once (cookies only matter: a cookie
names a flow's content); afterwards the installed set is what the last
committed bundle left. :meth:`Switch.sync` sends exactly the difference, deletes
before adds, in one atomic ONF bundle, so the switch never holds half a
configuration and an unchanged switch gets zero flow-mods.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from portmesh.controller.compiler import SwitchCompiler
from portmesh.controller.connection import OpenFlowConnection, SwitchError
from portmesh.controller.encoding import DP, EncodingCache, ofp, parser
from portmesh.controller.flows import Flow
from portmesh.controller.pipeline import Meter

log = logging.getLogger(__name__)

# Messages per write (and per drain): large enough to make writes cheap, small enough to keep memory flat.
DRAIN_EVERY = 1024


@dataclass
class SyncResult:
    """What one sync did: counts of flow-mods sent (zero when already converged)."""

    added: int
    deleted: int
    flows: int

    @property
    def flow_mods(self) -> int:
        return self.added + self.deleted


class Switch:
    """One connected switch: its ports, the cookies it holds, and how to change them."""

    def __init__(self, conn: OpenFlowConnection, cache: EncodingCache) -> None:
        self.conn = conn
        self.cache = cache
        self.ports: dict[str, int] = {}
        self._statuses: list[Any] | None = None  # port-status messages seen while read_ports waits
        self.installed: set[int] = set()
        # What the last successful sync was computed from: a store generation and a version of
        # ``ports``. A port change during a sync bumps ports_version, so the next pass syncs again
        # (a port that appeared mid-sync must not be forgotten).
        self.realized_generation = -1
        self.ports_version = 0
        self.realized_ports_version = -1
        # The compiler whose last output this switch holds exactly (then a change can be sent as a delta).
        self.compiler: SwitchCompiler | None = None
        self.in_step = False
        self.meters_set = False
        # The epoch at which this switch answered our role request MASTER (-1: not master here).
        self.role_epoch = -1

    def needs_sync(self, generation: int) -> bool:
        return self.realized_generation != generation or self.realized_ports_version != self.ports_version

    def realized(self, generation: int, ports_version: int) -> None:
        self.realized_generation = generation
        self.realized_ports_version = ports_version

    @property
    def datapath_id(self) -> int:
        return self.conn.datapath_id

    async def read_ports(self) -> dict[str, int]:
        """Port name → OpenFlow port number, from a port-description request.

        Port-status messages that arrive while the request is out are applied again, in order,
        on top of the reply: the connection reads a status sent right after the reply before
        this coroutine resumes, so assigning the reply alone lost a port added at that moment
        (seen: a gateway's uplink added as the switch connected never got its flows).
        """
        self._statuses = []
        try:
            replies = await self.conn.request(parser.OFPPortDescStatsRequest(DP, 0))
            self.ports = {p.name.decode(): p.port_no for r in replies for p in r.body if p.port_no < ofp.OFPP_MAX}
            for msg in self._statuses:
                self._apply_status(msg)
        finally:
            self._statuses = None
        self.ports_version += 1
        return self.ports

    def port_status(self, msg: Any) -> bool:
        """Apply a port-status message; True if the name → number map changed."""
        if self._statuses is not None:
            self._statuses.append(msg)
        return self._apply_status(msg)

    def _apply_status(self, msg: Any) -> bool:
        desc = msg.desc
        name = desc.name.decode()
        before = dict(self.ports)
        if msg.reason == ofp.OFPPR_DELETE:
            self.ports.pop(name, None)
        elif desc.port_no < ofp.OFPP_MAX:
            self.ports[name] = desc.port_no
        if before != self.ports:
            self.ports_version += 1
            return True
        return False

    async def set_meters(self) -> None:
        """Make every meter of the pipeline exist with its declared rate, before a flow refers to it.

        Meter-mods cannot ride in a bundle. Add, and modify if it exists already (a switch
        that outlived the controller); never delete, which would delete the flows using it.
        """
        for meter in Meter:
            spec = meter.value
            for command in (ofp.OFPMC_ADD, ofp.OFPMC_MODIFY):
                mod = parser.OFPMeterMod(DP, command=command, flags=ofp.OFPMF_PKTPS | ofp.OFPMF_BURST,
                                         meter_id=spec.meter_id,
                                         bands=[parser.OFPMeterBandDrop(rate=spec.rate_pps, burst_size=spec.burst)])
                try:
                    await self.conn.send_checked(mod)
                    break
                except SwitchError as exc:
                    if command != ofp.OFPMC_ADD or exc.code != ofp.OFPMMFC_METER_EXISTS:
                        raise
        self.meters_set = True

    async def read_installed(self) -> set[int]:
        """The cookies of every flow in every table, as the switch reports them."""
        self.installed = await self.conn.flow_cookies()
        return self.installed

    async def apply(self, added: list[Flow], removed: set[int]) -> SyncResult:
        """Send one change (a compiler delta) as one bundle; the common path for a store write."""
        adds = [f for f in added if f.cookie not in self.installed]
        deletes = removed & self.installed
        if not adds and not deletes:
            return SyncResult(0, 0, len(self.installed))
        conn = self.conn
        await conn.bundle_ctrl(ofp.ONF_BCT_OPEN_REQUEST)
        try:
            for cookie in deletes:
                conn.send(self.cache.delete(cookie))
            for flow in adds:
                conn.send(self.cache.add(flow))
        except Exception:
            await self._discard()
            raise
        await self._commit()
        self.installed -= deletes
        self.installed.update(f.cookie for f in adds)
        self.cache.forget(deletes)
        return SyncResult(len(adds), len(deletes), len(self.installed))

    async def _discard(self) -> None:
        """Throw away an open bundle after a failure on our side, so the next one can open."""
        try:
            await self.conn.bundle_ctrl(ofp.ONF_BCT_DISCARD_REQUEST)
        except (OSError, RuntimeError, TimeoutError) as exc:  # the connection may already be gone
            log.warning("switch %016x: discarding the open bundle failed: %s", self.datapath_id, exc)

    async def _commit(self) -> None:
        try:
            await self.conn.bundle_ctrl(ofp.ONF_BCT_COMMIT_REQUEST)
            await self.conn.barrier()
        except Exception:
            # The commit failed as a whole (the switch is unchanged); re-read so the next try diffs from truth.
            self.in_step = False
            await self.read_installed()
            raise

    async def sync(self, owners: Iterable[tuple[Flow, ...]]) -> SyncResult:
        """Make the switch hold exactly the flows in ``owners``; nothing is sent if it already does.

        Flows are sent while ``owners`` is still being produced (the compiler is a
        generator), so encoding here and the switch's own parsing overlap; the
        bundle is opened only when the first difference appears and committed at
        the end with the stale flows' deletions, so the change stays atomic.
        """
        conn = self.conn
        if not self.meters_set:
            await self.set_meters()
        installed = self.installed
        desired: set[int] = set()
        added = 0
        opened = False
        # Messages go out in batches: one write per DRAIN_EVERY messages instead of one syscall each
        # (at 200k flows the per-message writes, not the encoding, were the cost).
        batch: list[bytes] = []
        try:
            for flows in owners:
                for flow in flows:
                    cookie = flow.cookie
                    desired.add(cookie)
                    if cookie in installed:
                        continue
                    if not opened:
                        await conn.bundle_ctrl(ofp.ONF_BCT_OPEN_REQUEST)
                        opened = True
                    batch.append(self.cache.add(flow))
                    added += 1
                    if len(batch) >= DRAIN_EVERY:
                        conn.send(b"".join(batch))
                        batch.clear()
                        await conn.drain()
            stale = installed - desired
            if stale and not opened:
                await conn.bundle_ctrl(ofp.ONF_BCT_OPEN_REQUEST)
                opened = True
            batch.extend(self.cache.delete(cookie) for cookie in stale)
            if batch:
                conn.send(b"".join(batch))
                await conn.drain()
        except Exception:
            if opened:
                await self._discard()
            raise
        if not opened:
            self.installed = desired
            return SyncResult(0, 0, len(desired))
        await self._commit()
        self.installed = desired
        log.info("switch %016x: %d flows added, %d deleted", self.datapath_id, added, len(stale))
        return SyncResult(added, len(stale), len(desired))
