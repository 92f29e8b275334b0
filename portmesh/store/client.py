"""The store client: the one place the other components read and write desired state.

It keeps a replica of the Portmesh OVSDB database in memory through the OVS
Python IDL, driven by ovsdbapp's :class:`Connection` thread, so reads are local
and cheap and changes arrive as a stream (monitors), never by polling. Writes
are shipped to that thread and committed there, because the IDL is not
thread-safe; every caller-facing method is synchronous and thread-safe.

Every write of desired state increments ``Global.generation`` in the same
transaction and returns the new value: a switch or agent that has realised a
snapshot reports that number back, which is how ``--wait`` knows when a change
is live. Status reports (agent, controller) do not bump it, so they never make
the controller recompute.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from collections.abc import Mapping as MappingABC
from dataclasses import replace

from portmesh.model.blocks import BlockTaken
from portmesh.model.config import NetworkConfig
from portmesh.model.entities import (
    Container,
    ContainerStatus,
    DesiredState,
    Host,
    HostStatus,
    Mapping,
    MappingCounters,
    MappingKey,
    RunState,
)
from portmesh.model.errors import Conflict, InvalidInput, NotFound
from portmesh.model.validation import without_backend
from portmesh.store import rows as R
from portmesh.store.engine import Engine, StoreError, Txn
from portmesh.store.mirror import Committed

__all__ = ["Store", "StoreError"]


class Store(Engine):
    """Synchronous, thread-safe access to the Portmesh database (see docs/components.md).

    ``remote`` is ``unix:/path``, ``tcp:ip:port`` or a comma-separated list of
    those for a Raft cluster; the IDL then talks to the leader only. Call
    :meth:`start` (or use it as a context manager); a closed Store cannot be restarted.
    """

    # -- reads (local cache, consistent under the connection lock) -------------------------------

    def snapshot(self) -> DesiredState:
        """A consistent copy of the desired state, including its generation.

        The store keeps it current row by row as changes arrive (see :mod:`portmesh.store.mirror`),
        so this is three dictionary copies, whatever changed and however much there is.
        """
        with self._lock():
            return self._mirror.state()

    # Reads of one entity are lenient (a name that vanished since the caller's snapshot
    # gives the neutral value, not an error), so listings built from a snapshot never race.

    def container_running(self, name: str) -> bool:
        """Whether the container should run (desired run state); False if there is no such container."""
        with self._lock():
            row = self._container_row(name)
            return bool(row.running) if row is not None else False

    def container_status(self, name: str) -> ContainerStatus | None:
        """What the agent last reported; None if nothing yet or there is no such container."""
        with self._lock():
            row = self._container_row(name)
            return R.container_status_from_row(row) if row is not None else None

    def host_status(self, host: str) -> HostStatus:
        """How far the host's switch and agent have caught up (all zero for an unknown host)."""
        with self._lock():
            row = self._host_row(host)
            return R.host_status_from_row(row) if row is not None else HostStatus()

    def container_statuses(self) -> dict[str, ContainerStatus]:
        """Every reported container status, by name (one lock, for listings)."""
        with self._lock():
            found = ((r.name, R.container_status_from_row(r)) for r in self._rows("Container"))
            return {name: status for name, status in found if status is not None}

    def running_containers(self) -> set[str]:
        """Names of containers whose desired run state is running."""
        with self._lock():
            return {r.name for r in self._rows("Container") if r.running}

    def mapping_health(self, key: MappingKey) -> dict[str, str]:
        """What the agents last reported of the mapping's backends: name -> ``up`` or ``down: reason``
        (a backend absent is unchecked); empty for a key that is not mapped."""
        with self._lock():
            row = self._mapping(key)
            return {str(k): str(v) for k, v in Committed(row).backend_health.items()} if row is not None else {}

    def mapping_counters(self, key: MappingKey) -> MappingCounters:
        """The mapping's counters: what the master controller last wrote (summed over the OVS switches)
        plus what each eBPF host's agent last reported (schema 1.8.0, ``Host.counters``). Each packet
        is counted once, on the host where it entered the cloud, whichever datapath that host runs.
        Zero if nothing yet, or the key is not mapped, or this view does not replicate them (an agent's)."""
        with self._lock():
            row = self._mapping(key)
            if row is None:
                return MappingCounters()
            total = R.counters_from_column(getattr(Committed(row), "counters", {}))
            name = str(key)
            for host in self._rows("Host"):
                value = (getattr(Committed(host), "counters", None) or {}).get(name)
                if value is not None:
                    total = R.add_counters(total, R.host_counters_entry(value))
            return total

    def host_counters(self, host: str) -> dict[str, MappingCounters]:
        """What an eBPF host's agent last reported of its counted mappings: key text -> counters."""
        with self._lock():
            row = self._host_row(host)
            have = (getattr(Committed(row), "counters", None) or {}) if row is not None else {}
            return {str(k): R.host_counters_entry(v) for k, v in have.items()}

    def host_drops(self, host: str) -> dict[str, int]:
        """What an eBPF host's agent last reported of its program's drops: reason -> packets
        (empty for an OVS host, an unknown host, or before the first report)."""
        with self._lock():
            row = self._host_row(host)
            return R.host_drops_from_row(Committed(row)) if row is not None else {}

    # -- desired-state writes (bump the generation) ----------------------------------------------

    def add_host(self, host: Host, may_exist: bool = False) -> int:
        """Add a host; with ``may_exist`` an existing one is updated to ``host`` instead."""

        def build(txn: Txn) -> bool:
            R.check_host(host)  # before txn.insert: an inserted row must get its columns before any raise
            row = self._host_row(host.name)
            if row is not None:
                if not may_exist:
                    raise Conflict("name", f"host {host.name!r} already exists")
                have = R.host_from_row(row)
                if have == replace(host, uplink=have.uplink):  # the uplink is the agent's to say
                    return False
            else:
                row = txn.insert(self._idl.tables["Host"])
            R.fill_host_row(row, host)
            return True

        return self._write(build)

    def remove_host(self, name: str, if_exists: bool = False) -> int:
        """Remove a host that no container is placed on (Conflict otherwise), also when another client
        places one there meanwhile."""

        def build(txn: Txn) -> bool:
            row = self._host_row(name)
            if row is None:
                if if_exists:
                    return False
                raise NotFound("name", f"host {name!r} does not exist")
            placed = sorted(c.name for c in self._mirror.containers.values() if c.host == name)
            if placed:
                raise Conflict("name", f"host {name!r} still has containers: {', '.join(placed[:5])}")
            # A container another client placed on the host meanwhile, which this cache has not seen
            # yet, fails the commit; the check then runs again on fresh data. Without it, 25 of 60
            # races in tests/switch/test_store_remove_host.py left a container on a removed host.
            self._expect_none(txn, "Container", "host", name)
            row.delete()
            return True

        return self._write(build)

    def set_config(self, config: NetworkConfig) -> int:
        """Replace the cloud's configuration (the Global row's config columns); an unchanged config
        does not bump the generation. What may change, and when, is the API's call to make."""

        def build(txn: Txn) -> bool:
            rows = self._rows("Global")
            if not rows:
                R.fill_config(self._insert_global(txn), config)
                return True
            if self._mirror.config == config:
                return False
            R.fill_config(rows[0], config)
            return True

        return self._write(build)

    def add_container(self, c: Container, mappings: Sequence[Mapping] = ()) -> int:
        """Add a container (desired to run), its port-block claims and its mappings in one transaction.

        :class:`BlockTaken` if its block is claimed on one of its IPs, also when another writer
        commits that claim first: the ``Block`` table's index refuses the second commit.
        """

        def build(txn: Txn) -> bool:
            if c.name in self._mirror.container_rows:
                raise Conflict("name", f"container {c.name!r} already exists")
            self._verify(self._host(c.host, field="host"), "name")  # fails the commit if the host goes meanwhile
            row = txn.insert(self._idl.tables["Container"])
            R.fill_container_row(row, c)
            row.running = True
            keys: set[MappingKey] = set()
            for m in mappings:
                if m.container != c.name:
                    raise InvalidInput("container", f"mapping {m.key} names {m.container!r}, not {c.name!r}")
                if m.key in keys:
                    raise Conflict("port", f"{m.key} is listed twice")
                keys.add(m.key)
                for other in m.names[1:]:
                    self._verify(self._container(other, field="backends"), "name")
                self._insert_mapping(txn, m)
            for claim in R.block_claims(c):  # the index refuses a taken one anyway; this saves the round trip
                holder = self._mirror.claims.get(claim)
                if holder is not None:
                    raise BlockTaken("ips", f"port block {c.block.start}/{c.block.size} on {claim[0]} belongs to {holder!r}")
                R.fill_block_row(txn.insert(self._idl.tables["Block"]), claim, c.name)
            return True

        return self._write(build)

    def remove_container(self, name: str, if_exists: bool = False) -> int:
        """Remove a container, its port-block claims and its part in every mapping, in one transaction:
        a mapping it is the sole backend of goes; one with other backends stays without it.

        A mapping another client added (or gave it as a backend) just before, which this cache had
        not seen when the transaction was built, is dealt with right after (:meth:`_sweep_mappings`).
        A wait on "no mapping names it" would close even that moment, but ovsdb-server answers it by
        scanning the Mapping table: 67 ms a remove at 100,000 mappings, measured, with the server blocked.
        """

        def build(txn: Txn) -> bool:
            row = self._container_row(name)
            if row is None:
                if if_exists:
                    return False
                raise NotFound("name", f"container {name!r} does not exist")
            self._take_out(txn, name)
            for claim_uuid in self._mirror.claim_rows_of.get(name, ()):
                claim_row = self._row("Block", claim_uuid)
                if claim_row is not None:
                    claim_row.delete()
            row.delete()
            return True

        generation = self._write(build)
        return max(generation, self._sweep_mappings(name))

    def _take_out(self, txn: Txn, name: str) -> None:
        """Delete the mappings ``name`` is the sole backend of; take it out of the others (the next
        backend becomes the mapping's ``container`` if it was the first), its health report too."""
        for key in list(self._mirror.mappings_of.get(name, ())):
            m, row = self._mirror.mappings[key], self._mapping(key)
            if row is None:
                continue
            if m.names == (name,):
                row.delete()
                continue
            for column in R.MAPPING_WRITTEN:
                self._verify(row, column)  # a backend added meanwhile is not lost: rebuilt on fresh data
            R.fill_mapping_change(row, without_backend(m, name), m)
            self._forget_health(txn, row, [name])

    def _sweep_mappings(self, container: str) -> int:
        """Take ``container`` out of the mappings still naming it once it is gone; the generation
        written, or 0.

        After a commit the cache holds every commit before it (read-your-writes), so a mapping
        that won the race against the removal is in it now; one that comes later is refused
        (add_mapping and update_mapping verify their backends' rows). A container created again
        under the same name meanwhile keeps its mappings."""
        swept = False

        def build(txn: Txn) -> bool:
            nonlocal swept
            if not self._mirror.mappings_of.get(container) or self._container_row(container) is not None:
                return False
            self._take_out(txn, container)
            swept = True
            return True

        if not self._mirror.mappings_of.get(container):
            return 0  # the common case: nothing raced (the cache is already past the removal: see above)
        generation = self._write(build)
        return generation if swept else 0

    def add_mapping(self, m: Mapping) -> int:
        """Add one mapping with every field; each backend container must exist (NotFound, naming
        ``container`` for the first and ``backends`` for the others) and the key be free (Conflict)."""

        def build(txn: Txn) -> bool:
            self._verify(self._container(m.container, field="container"), "name")
            for other in m.names[1:]:
                self._verify(self._container(other, field="backends"), "name")
            self._insert_mapping(txn, m)
            return True

        return self._write(build)

    def update_mapping(self, key: MappingKey, change: Callable[[Mapping], Mapping]) -> int:
        """Change a mapping in one transaction: ``change`` gets the mapping as the store holds it and
        returns the new one (backends added or removed, weights, policy, health check); NotFound if
        ``key`` is not mapped, and whatever ``change`` raises. A new backend must exist.

        The columns written are verified, so a concurrent change of the same mapping (another
        client adding another backend) makes the commit fail and ``change`` run again on the fresh
        mapping: nothing is lost. A removed backend's health report goes too, and every report when
        the check is removed. An unchanged mapping writes nothing (the current generation)."""

        def build(txn: Txn) -> bool:
            row = self._mapping(key)
            old = self._mirror.mappings.get(key)
            if row is None or old is None:
                raise NotFound("mapping", f"{key} is not mapped")
            new = change(old)
            if new.key != key:
                raise InvalidInput("key", f"a mapping's key cannot change ({key} -> {new.key})")
            if (new.container, new.backends, new.allow, new.deny, new.health) == (
                old.container, old.backends, old.allow, old.deny, old.health
            ):
                return False
            for name in new.names:
                if name not in old.names:
                    self._verify(self._container(name, field="container"), "name")
            for column in R.MAPPING_WRITTEN:
                self._verify(row, column)
            R.fill_mapping_change(row, new, old)
            if new.health is None and old.health is not None:
                gone = list(Committed(row).backend_health)
            else:
                gone = [n for n in old.names if n not in new.names]
            self._forget_health(txn, row, gone)
            return True

        return self._write(build)

    def remove_mapping(self, key: MappingKey, if_exists: bool = False) -> int:
        """Remove the mapping with ``key``."""

        def build(txn: Txn) -> bool:
            row = self._mapping(key)
            if row is None:
                if if_exists:
                    return False
                raise NotFound("mapping", f"{key} is not mapped")
            row.delete()
            return True

        return self._write(build)

    def set_container_running(self, name: str, running: bool, stop_timeout: int | None = None) -> int:
        """Set the desired run state (stop/start); unchanged state does not bump the generation.

        ``stop_timeout`` (``stop?time=N``) is written in the same transaction, so the agent
        that sees the stop sees its timeout too. A start of a container whose agent does not
        report it running (exited under restart policy ``no``, or in error) counts in
        ``starts``: as ``docker start``, the runtime then starts it again.
        """

        def build(txn: Txn) -> bool:
            row = self._container(name)
            timeout_changed = stop_timeout is not None and list(row.stop_timeout) != [stop_timeout]
            start_asked = running and list(row.state) in ([RunState.EXITED.value], [RunState.ERROR.value])
            if bool(row.running) == running and not timeout_changed and not start_asked:
                return False
            row.running = running
            if timeout_changed:
                row.stop_timeout = [stop_timeout]
            if start_asked:
                row.starts = int(row.starts) + 1
            return True

        return self._write(build)

    # -- status reports (no generation bump) -----------------------------------------------------

    def report_container_status(self, name: str, status: ContainerStatus) -> None:
        """Agent: what it observed of the container; NotFound if the container is gone."""

        def build(txn: Txn) -> bool:
            R.fill_container_status(self._container(name), status)
            return True

        self._write(build, bump=False)

    def report_switch(self, host: str, generation: int, connected: bool, waiting: Collection[str] = ()) -> None:
        """Controller: the generation the host's switch has realised, whether it is connected, and the
        containers whose flows still wait for their port (see :class:`HostStatus`)."""

        def build(txn: Txn) -> bool:
            row = self._host(host, field="host")
            row.switch_generation = generation
            row.switch_connected = connected
            row.switch_waiting = sorted(waiting)
            return True

        self._write(build, bump=False)

    def report_agent(self, host: str, generation: int) -> None:
        """Agent: the generation it has realised on its host."""

        def build(txn: Txn) -> bool:
            self._host(host, field="host").agent_generation = generation
            return True

        self._write(build, bump=False)

    def report_tunnels(self, host: str, tunnels: MappingABC[str, str]) -> None:
        """Agent: the state of its tunnels, peer host -> ``up`` or ``down: reason`` (no generation bump).

        Written only when it differs from what this client last saw or wrote, so an agent may
        report after every pass: an unchanged report costs no round trip.
        """
        want = {str(peer): str(state) for peer, state in tunnels.items()}

        def build(txn: Txn) -> bool:
            row = self._host(host, field="host")
            if self._reported_tunnels.get(row.uuid) == want:
                return False
            if "tunnels" in row._data and dict(R.tunnels_from_row(Committed(row))) == want:
                self._reported_tunnels[row.uuid] = want
                return False
            row.tunnels = want
            written.append(row.uuid)
            return True

        written: list[object] = []
        self._write(build, bump=False)
        for row_uuid in written[-1:]:
            self._reported_tunnels[row_uuid] = want

    def report_heartbeat(self, host: str, beat: int, datapath: str | None = None) -> None:
        """Agent: its lease (schema 1.9.0), ``beat`` being a counter it bumps every heartbeat interval.

        One column of one row per beat, no generation bump: only the API monitors the column (it times
        the moves with its own clock, see api/progress.py ``Liveness``); agents' views and the
        controller's reader never hear of it. ``datapath`` (``ovs`` | ``ebpf``) is written with the
        first beat through this client and again only if it changes, so a beat stays one column.
        """

        def build(txn: Txn) -> bool:
            row = self._host(host, field="host")
            row.heartbeat = beat
            if datapath is not None and self._reported_datapath.get(row.uuid) != datapath:
                row.datapath = [datapath]
                written.append(row.uuid)
            return True

        written: list[object] = []
        self._write(build, bump=False)
        for row_uuid in written[-1:]:
            self._reported_datapath[row_uuid] = str(datapath)

    def report_uplink(self, host: str, uplink: str | None) -> None:
        """Agent: the interface it made a port of its bridge for inbound traffic (``--uplink``), or None.

        No generation bump: the controller monitors the column and recompiles the host's switch;
        nothing is written when the row already says so.
        """

        def build(txn: Txn) -> bool:
            row = self._host(host, field="host")
            if R.host_from_row(row).uplink == uplink:
                return False
            row.uplink = [uplink] if uplink else []
            return True

        self._write(build, bump=False)

    def report_traffic(
        self, host: str, counters: MappingABC[MappingKey, MappingCounters], drops: MappingABC[str, int]
    ) -> bool:
        """eBPF host's agent: its per-mapping counters (only filtered or balanced mappings: plain ones
        are not counted, as on OVS, so 100,000 plain mappings never become 100,000 entries) and its
        program's drops per reason, in its own Host row (schema 1.8.0). A Host column rather than a
        table: one row per host already exists, only that host's agent writes it, a host removal takes
        its reports along, and the whole report is one atomic write (mappings gone drop out of it).

        No generation bump, and nothing written when the report equals what this client last wrote or,
        where the view replicates the columns, what the row says: True if it wrote.
        """
        want_counters = R.host_counters_column(counters)
        want_drops = {str(reason): int(n) for reason, n in drops.items()}
        want = (want_counters, want_drops)

        def build(txn: Txn) -> bool:
            row = self._host(host, field="host")
            if self._reported_traffic.get(row.uuid) == want:
                return False
            committed = Committed(row)
            if "counters" in row._data and "drops" in row._data and (
                {str(k): str(v) for k, v in committed.counters.items()} == want_counters
                and R.host_drops_from_row(committed) == want_drops
            ):
                self._reported_traffic[row.uuid] = want
                return False
            row.counters = want_counters
            row.drops = want_drops
            written.append(row.uuid)
            return True

        written: list[object] = []
        self._write(build, bump=False)
        for row_uuid in written[-1:]:
            self._reported_traffic[row_uuid] = want
        return bool(written)

    def report_health(self, host: str, results: MappingABC[MappingKey, MappingABC[str, str]]) -> None:
        """Agent: its health checks' results, mapping -> backend -> ``up`` or ``down: reason``.

        Only entries of the mapping's backends placed on ``host`` are written (others, and mappings
        gone meanwhile, are skipped): one server-side ``mutate`` per changed mapping, replacing just
        those keys, so two agents reporting on one mapping at once both keep their entries. One
        transaction per call. A report that moves a backend into or out of "down" (on a mapping with
        a check) changes :attr:`Mapping.down`, hence the flows every switch should hold: it bumps the
        generation in the same transaction, as a desired change does, so the controller (which syncs
        a switch when the generation moves) and ``--wait`` see it; any other report (the first "up",
        another reason) does not. Nothing is written when nothing changed.
        """
        want = {key: {str(n): str(state) for n, state in states.items()} for key, states in results.items()}

        def build(txn: Txn) -> bool:
            wrote = bumped = False
            for key, states in want.items():
                m, row = self._mirror.mappings.get(key), self._mapping(key)
                if m is None or row is None:
                    continue
                mine = {n: state for n, state in states.items() if n in m.names and self._placed(n, host)}
                last = Committed(row).backend_health  # replicated in every view, the agent's too
                changed = {n: state for n, state in mine.items() if last.get(n) != state}
                if not changed:
                    continue
                flips = m.health is not None and any(
                    str(last.get(n, "")).startswith(R.DOWN) != state.startswith(R.DOWN) for n, state in changed.items()
                )
                if flips and not bumped:  # Mapping.down changes: the switches' flows do too
                    bumped = self._bump(txn) or True
                txn.add_op({
                    "op": "mutate", "table": "Mapping", "where": [["_uuid", "==", ["uuid", str(row.uuid)]]],
                    "mutations": [
                        ["backend_health", "delete", ["set", sorted(changed)]],
                        ["backend_health", "insert", ["map", [[n, changed[n]] for n in sorted(changed)]]],
                    ],
                })
                wrote = True
            return wrote

        self._write(build, bump=False)

    def _placed(self, container: str, host: str) -> bool:
        c = self._mirror.containers.get(container)
        return c is not None and c.host == host

    def _forget_health(self, txn: Txn, row: R.Row, names: Collection[str]) -> None:
        """Delete these backends' health reports from ``row`` (server-side, so other entries stay)."""
        if names:
            txn.add_op({
                "op": "mutate", "table": "Mapping", "where": [["_uuid", "==", ["uuid", str(row.uuid)]]],
                "mutations": [["backend_health", "delete", ["set", sorted(names)]]],
            })

    def _host_row(self, name: str) -> R.Row | None:
        return self._row("Host", self._mirror.host_rows.get(name))

    def _container_row(self, name: str) -> R.Row | None:
        return self._row("Container", self._mirror.container_rows.get(name))

    def _host(self, name: str, field: str = "name") -> R.Row:
        row = self._host_row(name)
        if row is None:
            raise NotFound(field, f"host {name!r} does not exist")
        return row

    def _container(self, name: str, field: str = "name") -> R.Row:
        row = self._container_row(name)
        if row is None:
            raise NotFound(field, f"container {name!r} does not exist")
        return row

    def _mapping(self, key: MappingKey) -> R.Row:
        return self._row("Mapping", self._mirror.mapping_rows.get(key))

    def _insert_mapping(self, txn: Txn, m: Mapping) -> None:
        existing = self._mapping(m.key)
        if existing is not None:
            raise Conflict("port", f"{m.key} is already mapped to {existing.container!r}")
        if len(set(m.names)) != len(m.names):
            raise InvalidInput("backends", f"a backend of {m.key} is named twice")
        R.fill_mapping_row(txn.insert(self._idl.tables["Mapping"]), m)
