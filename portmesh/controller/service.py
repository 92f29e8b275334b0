"""The controller process: desired state from the store in, flows on every switch out.

Store changes only set a flag; one task reads the newest snapshot and wakes the
task of each connected switch that lags, which turns it into that switch's
desired flow set and syncs it, so a burst of writes becomes one bundle per
switch and a slow or dead switch never holds back the others. The flows every
switch shares (mapping rewrites, reply blocks, public IPs) are built once for
all of them (:class:`CommonFlows`), from the config in the snapshot itself: a
config change means fresh compilers and a full sync of every switch.

After a switch holds the flows of generation G the controller reports G for
that host (what ``--wait`` waits for), together with the host's containers
that have no port on the switch yet, hence no flows: a
container that cannot start never gets a port, and waiting for it would hold
back every later write on its host (the API waits per object instead).

With an :class:`Election` (the process always has one: the store's lock), only
the master syncs flows, reports switch status and answers packet-ins; a standby
keeps its switch connections (role SLAVE) and its port maps, and writes nothing.
On winning the lock it claims a new epoch, and each switch is then asked for
MASTER with that generation id, its cookies re-read and fully synced (zero
flow-mods when nothing changed) before its status is reported. See
:mod:`portmesh.controller.roles` for how a stale master is stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol

from portmesh.controller import icmp
from portmesh.controller.compiler import CommonFlows, SwitchCompiler
from portmesh.controller.connection import OpenFlowConnection
from portmesh.controller.counters import CounterReporter
from portmesh.controller.encoding import DP, EncodingCache, ofp, parser, serialize
from portmesh.controller.metrics import ControllerMetrics
from portmesh.controller.pipeline import Table
from portmesh.controller.reject import refusal
from portmesh.controller.roles import (
    Role,
    Step,
    error_says_newer_master,
    next_step,
    request_role,
    says_newer_master,
    switch_generation,
)
from portmesh.controller.switch import Switch
from portmesh.model.entities import DesiredState

log = logging.getLogger(__name__)

# Pause before retrying after the store could not be read or written.
STORE_RETRY_S = 1.0
# Least time between two status reports of one switch. While containers come up, every port that
# appears is a sync and each report carries the set of containers still waiting for a port (up to
# N names): reported on every sync, the store, the API and the agent re-read it hundreds of times
# (the agent replicates Host). Flows are never delayed, only such a report: the first after a quiet
# spell goes at once, later ones at most this often (a leading-edge throttle). Reports whose waiting
# set is empty or unchanged are never held back, so back-to-back writes each answer at once.
REPORT_INTERVAL_S = 0.1


class StateSource(Protocol):
    """What the controller needs from the store (portmesh.store.client.Store satisfies it)."""

    def snapshot(self) -> DesiredState: ...

    def subscribe(self, callback: Any) -> None: ...

    def report_switch(self, host: str, generation: int, connected: bool, waiting: Collection[str] = ()) -> None: ...


class Election(Protocol):
    """Leader election through the store (portmesh.store.reader.StateReader made with a lock)."""

    def on_election(self, callback: Any) -> None: ...

    def lock_held(self) -> bool: ...

    def leader(self) -> tuple[int, str]: ...

    def claim_epoch(self, name: str, above: int = 0) -> int: ...

    def relinquish(self) -> None: ...


class Controller:
    """Accepts switch connections and keeps every switch equal to the compiled desired state."""

    def __init__(
        self,
        store: StateSource,
        echo_idle: float = 5.0,
        echo_timeout: float = 5.0,
        election: Election | None = None,
        name: str = "controller",
    ) -> None:
        self.store = store
        # Without an election (tests with an in-memory store) this instance is the only one: always
        # master, and no role is asked (the switch's default, EQUAL, lets it write).
        self.election = election
        self.name = name
        self.master = election is None
        self.epoch = 0
        self._election_changed = asyncio.Event()
        # The newest snapshot and the flows shared by every switch's compiler, built for its config.
        self.state: DesiredState | None = None
        self.common: CommonFlows | None = None
        self._wake: dict[int, asyncio.Event] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        # Switch liveness (OpenFlowConnection.keepalive): probe after echo_idle s of silence, drop the
        # connection after echo_timeout s more without an answer; echo_idle <= 0 turns probing off.
        self.echo_idle = echo_idle
        self.echo_timeout = echo_timeout
        self.cache = EncodingCache()
        self.switches: dict[int, Switch] = {}
        self._dirty = asyncio.Event()
        self.syncs = 0
        self.flow_mods = 0
        self.metrics = ControllerMetrics()
        self._handlers: set[asyncio.Task[Any]] = set()
        # Per datapath: the (generation, waiting containers) last reported to the store.
        self._reported: dict[int, tuple[int, frozenset[str]]] = {}
        self._reported_at: dict[int, float] = {}  # loop time of that report

    def attach(self) -> None:
        """Subscribe to the store; its callback runs on the store's thread, so hop to our loop."""
        loop = asyncio.get_running_loop()
        self.store.subscribe(lambda: loop.call_soon_threadsafe(self._dirty.set))
        self._dirty.set()
        if self.election is not None:
            self.election.on_election(lambda: loop.call_soon_threadsafe(self._election_changed.set))
            self._election_changed.set()
        self.metrics.is_master.set(int(self.master))

    async def run(self) -> None:
        """Converge forever (and follow the election, if there is one); either dying ends this.
        The master also reports per-mapping counters (:mod:`portmesh.controller.counters`)."""
        counters = CounterReporter(self).run()
        if self.election is None:
            await asyncio.gather(self._converge(), counters)
            return
        await asyncio.gather(self._converge(), self._follow_election(), counters)

    async def _follow_election(self) -> None:
        """Become master when the store's lock is ours, standby the moment it is not."""
        assert self.election is not None
        election = self.election
        shown: tuple[int, str] | None = None
        while True:
            await self._election_changed.wait()
            self._election_changed.clear()
            step = next_step(self.master, election.lock_held())
            if step is Step.RESIGN:
                self.demote("lost the store lock")
            elif step is Step.CLAIM:
                try:
                    epoch = await asyncio.to_thread(election.claim_epoch, self.name)
                except Exception as exc:
                    # The lock went between the notification and the claim, or the store is away.
                    log.warning("could not claim the controller epoch: %s; retrying", exc)
                    await asyncio.sleep(STORE_RETRY_S / 2)
                    self._election_changed.set()
                    continue
                if election.lock_held():
                    self._promote(epoch)
            epoch, master = election.leader()
            # (our own name there is the store's memory of our last term, not news)
            if not self.master and (epoch, master) != shown and master and master != self.name:
                shown = (epoch, master)
                log.info("standby: %s is master (epoch %d)", master, epoch)
                self.metrics.epoch.set(epoch)
                for switch in list(self.switches.values()):
                    self._ask_slave(switch)

    def _promote(self, epoch: int) -> None:
        """Master from now on: every switch gets MASTER(epoch), a cookie re-read and a full sync."""
        self.master, self.epoch = True, epoch
        log.info("became master (epoch %d)", epoch)
        self.metrics.is_master.set(1)
        self.metrics.epoch.set(epoch)
        self._reported.clear()
        for dpid, switch in self.switches.items():
            switch.in_step = False
            switch.realized(-1, -1)
            self._wake[dpid].set()
        task = asyncio.ensure_future(self._report_absent(epoch))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _report_absent(self, epoch: int) -> None:
        """A new master reports "disconnected" for each host whose switch is not connected to it.

        The store still shows what the previous master last said (it may have died before it could
        report a switch it lost), and a standby reports nothing: without this a switch that talks to
        neither instance would stay "connected" until it came back.
        """
        state = self.state
        if state is None:
            state = await asyncio.to_thread(self.store.snapshot)
        connected = set(self.switches)
        for host in sorted(state.hosts.values(), key=lambda h: h.name):
            if host.datapath_id in connected:
                continue
            if not self.master or self.epoch != epoch or host.datapath_id in self.switches:
                continue  # demoted meanwhile, or the switch has just connected (its sync reports)
            try:
                await asyncio.to_thread(self.store.report_switch, host.name, 0, False)
            except Exception as exc:  # best effort, like every disconnect report
                log.warning("could not report host %s's switch disconnected: %s", host.name, exc)

    def demote(self, why: str) -> None:
        """Stop writing at once and go standby (a lost lock, or a switch that knows a newer master)."""
        if self.election is None or not self.master:
            return
        self.master = False
        log.warning("became standby: %s", why)
        self.metrics.is_master.set(0)
        for switch in list(self.switches.values()):
            switch.role_epoch = -1
            self._ask_slave(switch)
        if self.election.lock_held():
            self.election.relinquish()  # a switch saw a newer master: let whoever waits have the lock
        self._election_changed.set()

    def _ask_slave(self, switch: Switch) -> None:
        """Tell the switch we are a slave (best effort, in the background: a refusal changes nothing)."""
        assert self.election is not None
        epoch = max(self.election.leader()[0], self.epoch)

        async def ask() -> None:
            try:
                await request_role(switch.conn, Role.SLAVE, epoch)
            except Exception as exc:
                log.debug("switch %016x: role SLAVE(%d) not taken: %s", switch.datapath_id, epoch, exc)

        task = asyncio.ensure_future(ask())
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _ensure_master_role(self, switch: Switch) -> bool:
        """True if this switch takes our writes: we are master and it has said MASTER at our epoch."""
        if self.election is None:
            return True
        epoch = self.epoch
        if not self.master:
            return False
        if switch.role_epoch == epoch:
            return True
        try:
            await request_role(switch.conn, Role.MASTER, epoch)
        except Exception as exc:
            if not says_newer_master(exc):
                raise
            if await self._catch_up(switch, epoch):
                return False  # a fresh epoch: every switch is asked again
            self.demote(f"switch {switch.datapath_id:016x} refused MASTER({epoch}): a newer master exists")
            return False
        if not self.master or self.epoch != epoch:
            return False
        # Another master may have changed the flows meanwhile: diff from what the switch holds now.
        await switch.read_installed()
        switch.in_step = False
        switch.role_epoch = epoch
        log.info("switch %016x: role MASTER (epoch %d), %d flows", switch.datapath_id, epoch, len(switch.installed))
        return True

    async def _catch_up(self, switch: Switch, epoch: int) -> bool:
        """A switch refused MASTER(epoch) as stale: is it the store that is behind? True if we moved past it.

        Nobody can claim an epoch without the lock, which we hold: a switch that has seen a newer
        generation id then outlived a store that was restored or recreated (its epoch went back).
        The epoch jumps past the switch's id, in a transaction that asserts the lock, so a master that
        only believes it holds the lock (frozen, its store session gone) fails here and goes standby.
        """
        assert self.election is not None
        if not self.election.lock_held():
            return False
        try:
            seen = await switch_generation(switch.conn)
            fresh = await asyncio.to_thread(self.election.claim_epoch, self.name, seen)
        except Exception as exc:
            log.warning("switch %016x refused MASTER(%d) and the epoch could not move past it: %s",
                        switch.datapath_id, epoch, exc)
            return False
        if not self.master or self.epoch != epoch:
            return False
        log.warning("switch %016x has seen generation id %d, beyond epoch %d (the store went back?): claimed "
                    "epoch %d", switch.datapath_id, seen, epoch, fresh)
        self._promote(fresh)
        return True

    async def _converge(self) -> None:
        """Wait for a change, wake every switch that lags the newest snapshot."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                state = await asyncio.to_thread(self.store.snapshot)
            except Exception:
                # The loop that serves every switch must outlive a store outage: loud, then retried.
                log.exception("cannot read the desired state; retrying in %.1f s", STORE_RETRY_S)
                await asyncio.sleep(STORE_RETRY_S)
                self._dirty.set()
                continue
            self.adopt(state)
            for dpid, switch in self.switches.items():
                # e.g. our own status report came back through the store: nothing to wake
                if switch.needs_sync(state.generation):
                    self._wake[dpid].set()

    def adopt(self, state: DesiredState) -> None:
        """Make ``state`` the newest snapshot; a new config gets new shared flows (hence fresh compilers)."""
        self.state = state
        if self.common is None or self.common.config != state.config:
            if self.common is not None:
                log.info("network config changed: every switch is compiled afresh")
            self.common = CommonFlows(state.config)

    async def _serve(self, switch: Switch, wake: asyncio.Event) -> None:
        """One switch's task: sync it whenever it lags the newest snapshot, independently of the others."""
        while True:
            await wake.wait()
            wake.clear()
            state = self.state
            if state is None or not switch.needs_sync(state.generation):
                continue
            try:
                if not await self._ensure_master_role(switch):
                    continue  # standby: promotion wakes every switch again
                full = await self._sync(switch, state)
            except Exception:
                # This task is the switch's only way to its flows: it must outlive any bug in one pass.
                log.exception("switch %016x: sync pass failed; retrying", switch.datapath_id)
                await asyncio.sleep(0.5)
                wake.set()
                continue
            if self.state is not state:
                wake.set()  # a newer snapshot arrived meanwhile
            if full:
                # After a full sync, drop encodings no switch holds (a delta forgets its own deletions).
                wanted: set[int] = set()
                for other in self.switches.values():
                    wanted |= other.installed
                self.cache.retain(wanted)
            if self.common is not None and not any(s.needs_sync(state.generation) for s in self.switches.values()):
                self.common.prune(state)  # every switch is past the older snapshots

    async def _sync(self, switch: Switch, state: DesiredState) -> bool:
        """Sync one switch to ``state`` and report the generation it now realises; True if it was a full sync."""
        host = self.host_of(state, switch.datapath_id)
        if host is None:
            log.warning("switch %016x belongs to no known host; leaving it alone", switch.datapath_id)
            switch.realized(state.generation, switch.ports_version)
            return False
        if self.common is None or self.common.config != state.config:
            self.common = CommonFlows(state.config)
        compiler = switch.compiler
        if compiler is None or compiler.host != host or compiler.common is not self.common:
            compiler = SwitchCompiler(self.common.config, host, self.common)
            switch.compiler, switch.in_step = compiler, False
        started = time.perf_counter()
        ports_version, ports = switch.ports_version, dict(switch.ports)
        # A delta covers port changes too (a container's or tunnel's port is an input of its owner's
        # flows, rebuilt when it changes): a container starting among 100,000 mappings costs its own
        # flows, not a walk over all of them. Full only when the switch may hold anything else.
        full = not switch.in_step
        try:
            if not full:
                result = await switch.apply(*compiler.delta(state, ports))
            else:
                switch.in_step = False
                result = await switch.sync(compiler.owners(state, ports))
            switch.in_step = True
        except Exception as exc:
            switch.in_step = False
            if says_newer_master(exc):
                self.demote(f"switch {switch.datapath_id:016x} refused a write: a newer master exists")
                return full
            # Logged with its traceback and retried (bounded by the sleep): one bad sync must not end
            # the loop that serves every switch.
            log.exception("switch %016x (%s): sync failed; retrying", switch.datapath_id, host)
            await asyncio.sleep(0.5)  # a persistent failure must not spin the loop
            self._dirty.set()
            return full
        switch.realized(state.generation, ports_version)
        self.syncs += 1
        self.flow_mods += result.flow_mods
        done = time.perf_counter()
        m = self.metrics
        m.syncs.labels(host).inc()
        m.flow_mods.labels(host, "add").inc(result.added)
        m.flow_mods.labels(host, "delete").inc(result.deleted)
        m.sync_seconds.labels(host).observe(done - started)
        m.flows.labels(host).set(result.flows)
        # Containers whose port is not on the bridge have no flows yet (a port-status triggers the next
        # sync). The generation is reported all the same, naming them: a container that never gets a
        # port (it cannot start) must not hold back every other write on this host, and whoever waits
        # for one container checks that it is not listed (API, per-object wait).
        waiting = frozenset(c.name for c in state.containers.values() if c.host == host and c.port_name not in ports)
        if waiting:
            log.info("switch %016x (%s): generation %d; %d containers wait for their ports: %s", switch.datapath_id,
                     host, state.generation, len(waiting), ", ".join(sorted(waiting)[:5]))
        if result.flow_mods:
            log.info("switch %016x (%s): generation %d, %d flows; compile+send+commit %.3f s",
                     switch.datapath_id, host, state.generation, result.flows, done - started)
        self.metrics.generation.labels(host).set(state.generation)
        previous = self._reported.get(switch.datapath_id)
        if not self.master:
            return full  # demoted during this sync: only the master reports
        if previous == (state.generation, waiting):
            return full  # e.g. a port of another bridge came and went: nothing new to say
        loop = asyncio.get_running_loop()
        early = self._reported_at.get(switch.datapath_id, -REPORT_INTERVAL_S) + REPORT_INTERVAL_S - loop.time()
        # Only a report that names a new set of waiting containers is held back: a write that changes
        # nothing about ports (a mapping, say), or the last port arriving, is reported at once.
        if early > 0 and waiting and (previous is None or previous[1] != waiting):
            # Report later: mark the switch unrealised (the next pass is an empty delta: nothing sent) and wake then.
            switch.realized(-1, ports_version)
            loop.call_later(early, self._dirty.set)
            return full
        try:
            await asyncio.to_thread(self.store.report_switch, host, state.generation, True, waiting)
            self._reported[switch.datapath_id] = (state.generation, waiting)
            self._reported_at[switch.datapath_id] = loop.time()
        except Exception as exc:
            # The flows are in; only the report is missing. Mark the switch unrealised so the next
            # pass (an empty delta: nothing sent) reports again, and schedule that pass.
            log.warning("switch %016x (%s): could not report generation %d (%s); retrying in %.1f s",
                        switch.datapath_id, host, state.generation, exc, STORE_RETRY_S)
            switch.realized(-1, ports_version)
            asyncio.get_running_loop().call_later(STORE_RETRY_S, self._dirty.set)
        return full

    @staticmethod
    def host_of(state: DesiredState, datapath_id: int) -> str | None:
        for host in state.hosts.values():
            if host.datapath_id == datapath_id:
                return host.name
        return None

    async def handle_switch(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One switch connection: handshake, read what it holds, sync, then serve its events."""
        conn = OpenFlowConnection(reader, writer)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        switch: Switch | None = None
        serving: asyncio.Task[None] | None = None
        alive: asyncio.Task[None] | None = None
        try:
            dpid = await conn.handshake()
            switch = Switch(conn, self.cache)
            serving = asyncio.create_task(conn.serve(self._handler(switch)))
            if self.echo_idle > 0:
                alive = asyncio.create_task(conn.keepalive(self.echo_idle, self.echo_timeout))
            await switch.read_ports()
            # A master with an election reads the cookies right after the switch says MASTER (not
            # before: a stale master may still write until then); anybody else reads them here.
            if self.election is None or not await self._ensure_master_role(switch):
                await switch.read_installed()
                if self.election is not None:
                    self._ask_slave(switch)
            old = self.switches.get(dpid)
            if old is not None:
                old.conn.close()
                self._stop_task(dpid)
            self.switches[dpid] = switch
            wake = self._wake[dpid] = asyncio.Event()
            self._tasks[dpid] = asyncio.create_task(self._serve(switch, wake))
            self.metrics.switches.set(len(self.switches))
            log.info("switch %016x connected from %s with %d flows", dpid, conn.peer, len(switch.installed))
            self._dirty.set()
            await serving
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            log.info("switch connection %s ended: %s", conn.peer, exc)
        finally:
            if serving is not None:
                serving.cancel()
            if alive is not None:
                alive.cancel()
                if alive.done() and not alive.cancelled():
                    alive.exception()  # it ends with the connection's error: seen, so not "never retrieved"
            conn.close()
            if switch is not None and self.switches.get(switch.datapath_id) is switch:
                del self.switches[switch.datapath_id]
                self._stop_task(switch.datapath_id)
                self._reported.pop(switch.datapath_id, None)
                self.metrics.switches.set(len(self.switches))
                await self._report_disconnected(switch.datapath_id)
            if task is not None:
                self._handlers.discard(task)

    def _stop_task(self, dpid: int) -> None:
        task = self._tasks.pop(dpid, None)
        if task is not None:
            task.cancel()
        self._wake.pop(dpid, None)

    async def close(self, timeout: float = 5.0) -> None:
        """Drop every switch connection and let each handler report its switch disconnected.

        Called on shutdown before the store closes, so those reports still reach it. The
        switches keep their flows (fail_mode=secure): traffic goes on without a controller.
        """
        for switch in list(self.switches.values()):
            switch.conn.close()
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=timeout)

    async def _report_disconnected(self, dpid: int) -> None:
        """Tell the store the switch is gone, so ``--wait`` does not trust a stale generation."""
        if not self.master:
            return  # only the master reports (a standby's connection says nothing about the master's)
        state = await asyncio.to_thread(self.store.snapshot)
        host = self.host_of(state, dpid)
        if host is None:
            return
        try:
            await asyncio.to_thread(self.store.report_switch, host, 0, False)
        except Exception as exc:  # best effort: the store may be down too; it must not kill the handler
            log.warning("could not report switch %016x (%s) disconnected: %s", dpid, host, exc)

    def _handler(self, switch: Switch) -> Callable[[Any], Awaitable[None]]:
        async def handle(msg: Any) -> None:
            await self._on_message(switch, msg)

        return handle

    async def _on_message(self, switch: Switch, msg: Any) -> None:
        if msg.msg_type == ofp.OFPT_PORT_STATUS:
            if switch.port_status(msg):
                self._dirty.set()
        elif msg.msg_type == ofp.OFPT_PACKET_IN:
            self.metrics.packet_ins.labels("master" if self.master else "standby").inc()
            if not self.master:
                return  # a slave gets no packet-ins by default; a connection not yet SLAVE (EQUAL) might
            if icmp.is_icmp(bytes(msg.data)):
                self._icmp_error(switch, msg)
            else:
                self._reject(switch, msg)
        elif msg.msg_type == ofp.OFPT_ERROR:
            if error_says_newer_master(msg):
                self.demote(f"switch {switch.datapath_id:016x} refused a write: a newer master exists")
                return
            log.error("switch %016x: unsolicited OpenFlow error type=%s code=%s", switch.datapath_id, msg.type, msg.code)

    def _icmp_error(self, switch: Switch, msg: Any) -> None:
        """An ICMP error: on to the owner of the port it quotes, or dropped (see portmesh/controller/icmp.py)."""
        verdict, out = icmp.forward(bytes(msg.data), msg.match["in_port"], msg.table_id, switch.compiler)
        host = switch.compiler.host if switch.compiler is not None else "?"
        direction = "out" if msg.table_id == Table.CLASSIFY.number else "in"
        self.metrics.icmp_errors.labels(host, direction, verdict.value).inc()
        if out is not None:
            switch.conn.send(serialize(out, switch.conn.next_xid()))

    def _reject(self, switch: Switch, msg: Any) -> None:
        if self.state is None:
            return
        reply = refusal(bytes(msg.data), self.state.config.virtual_mac)
        if reply is None:
            return
        in_port = msg.match["in_port"]
        out = parser.OFPPacketOut(
            DP,
            buffer_id=ofp.OFP_NO_BUFFER,
            in_port=ofp.OFPP_CONTROLLER,
            actions=[parser.OFPActionOutput(in_port)],
            data=reply,
        )
        switch.conn.send(serialize(out, switch.conn.next_xid()))
