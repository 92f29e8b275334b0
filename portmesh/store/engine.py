"""The machinery under :class:`portmesh.store.client.Store`: IDL thread, notifications, commits.

The OVS Python IDL keeps a replica of the database in memory and is not
thread-safe, so it lives in ovsdbapp's :class:`Connection` thread: reads take
that connection's lock, writes are shipped to the thread as jobs and committed
there. Changes arrive as a monitor stream (never polled) and subscribers are
told after each batch, never in the middle of a commit (the cache then holds
uncommitted rows).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Self

with warnings.catch_warnings():
    # ovs.poller (imported by ovs.db.idl) imports eventlet only to detect
    # monkey-patching, which we never do; its deprecation banner is noise.
    warnings.simplefilter("ignore")
    from ovs.db import custom_index
    from ovs.db import idl as ovs_idl
    from ovsdbapp import exceptions as ovsdbapp_exc
    from ovsdbapp.backend.ovs_idl import connection as ovs_conn
    from ovsdbapp.backend.ovs_idl import idlutils

from portmesh.model.config import DEFAULT_CONFIG  # only to initialise a database without a Global row
from portmesh.store import rows as R
from portmesh.store.jsonstream import install as install_stream_parser
from portmesh.store.mirror import Committed, Mirror

LOG = logging.getLogger(__name__)

# A constraint violation fails on every attempt, a lost leader or a concurrent
# writer only for a moment: retry TRY_AGAIN, but not forever.
MAX_ATTEMPTS = 20  # commits the server answered; see _commit
# The IDL's reconnect backoff doubles up to 8 s by default; after a Raft leader
# dies that delayed recovery by 7-20 s. Capped at 1 s it takes 2-3 s.
RECONNECT_BACKOFF_MS = 1000

Txn = Any  # ovs.db.idl.Transaction (untyped library)
# Builds a transaction from the cache; returns False when there is nothing to change.
Build = Callable[[Txn], bool]


# What a host agent's view replicates (Store(remote, host=NAME)), and the Host columns it writes
# without replicating them (its reports; see Engine.__init__).
AGENT_VIEW_TABLES = ("Global", "Host", "Container", "Mapping")
AGENT_WRITES: dict[str, tuple[str, ...]] = {"Host": ("agent_generation", "tunnels", "heartbeat", "datapath")}
# Which rows an agent's view holds: its own host's containers, and the mappings with a health check
# (schema 1.6.0), so it knows which of its containers to check; a plain mapping never reaches it.
AGENT_MAPPINGS: list[Any] = [["health", "!=", ["map", []]]]
# The hosts' traffic reports (schema 1.8.0: an eBPF host's per-mapping counters and drops, rewritten
# every few seconds while traffic flows): a view made with ``reports=False`` registers them (it may
# write its own) but does not monitor them, so no host's counters ever wake an eBPF agent.
REPORT_COLUMNS: dict[str, tuple[str, ...]] = {"Host": ("counters", "drops")}
# The agents' leases (schema 1.9.0): every agent bumps its Host row's ``heartbeat`` every second or so.
# Only the API reads them; an agent's view (either kind) registers them to write its own but monitors
# none, and the controller's reader monitors only the desired columns, so a beat never wakes either
# into a pass or a compile.
HEARTBEAT_COLUMNS: dict[str, tuple[str, ...]] = {"Host": ("heartbeat", "datapath")}


class StoreError(RuntimeError):
    """The store could not be reached, or a commit did not go through in time."""


class _Rows(custom_index.IndexedRows):  # type: ignore[misc]
    """A table's rows that say when the IDL empties them (it does so, without row notices,
    before it loads the whole database again after a reconnect)."""

    def __init__(self, table: Any, on_clear: Callable[[], None]) -> None:
        super().__init__(table)
        self.on_clear = on_clear

    def clear(self) -> None:
        super().clear()
        self.on_clear()


class _Idl(ovs_conn.OvsdbIdl):  # type: ignore[misc]
    """The IDL, with hooks so the store can keep its mirror current and tell subscribers.

    ``on_row(event, row)`` gets every row notice; ``on_reload()`` is called at the
    end of a ``run`` in which the IDL threw its cache away and loaded it again (no
    notices say what went meanwhile); ``after_run(changed)`` after every ``run``.
    """

    def __init__(self, remote: str, helper: Any, after_run: Callable[[bool], None],
                 on_row: Callable[[str, Any], None], on_reload: Callable[[], None],
                 unmonitored: dict[str, tuple[str, ...]], where: dict[str, list[Any]]) -> None:
        super().__init__(remote, helper, leader_only=True)
        self._after_run, self._on_row, self._on_reload = after_run, on_row, on_reload
        self._unmonitored, self._where = unmonitored, where
        self._reloading = False
        for table in self.tables.values():
            table.rows = _Rows(table, self._cleared)

    def _cleared(self) -> None:
        self._reloading = True

    def notify(self, event: str, row: Any, updates: Any = None) -> None:
        if not self._reloading:  # a reload rebuilds everything at the end of the run anyway
            self._on_row(event, row)

    def send_request(self, request: Any) -> Any:
        """Every monitor request of the Portmesh database (first, and after each reconnect) asks
        for the registered columns minus ``unmonitored`` (written, never read: the library's own
        ``readonly`` columns cannot be written) and only the rows matching ``where``.

        Setting the condition here rather than by ``cond_change`` means the very first load
        already holds only those rows, and a reconnect (``monitor_cond_since``) asks the same."""
        if request.method in ("monitor", "monitor_cond", "monitor_cond_since") and request.params[0] == self._db.name:
            for table, monitor_requests in request.params[2].items():
                for monitor_request in monitor_requests:
                    drop = self._unmonitored.get(table, ())
                    monitor_request["columns"] = [c for c in monitor_request["columns"] if c not in drop]
                    if table in self._where and request.method != "monitor":
                        monitor_request["where"] = self._where[table]
        return super().send_request(request)

    def cooperative_yield(self) -> None:
        """Do not yield per row. ovsdbapp sleeps 0 s for every row of an update (for eventlet);
        with real threads that is a GIL release per row: ~2 ms per 250-row update when nothing
        else runs, and up to a 5 ms switch interval per row when another thread is busy.
        Python's GIL switch interval keeps the other threads running anyway."""

    def run(self) -> bool:
        seqno = self.change_seqno
        changed = bool(super().run())
        if self._reloading:
            self._reloading = False
            self._on_reload()
        self._after_run(changed or self.change_seqno != seqno)
        return changed


class _Job:
    """A write queued to the connection thread; quacks like an ovsdbapp transaction."""

    def __init__(self, store: Engine, build: Build, bump: bool) -> None:
        self.store, self.build, self.bump = store, build, bump
        self.results: queue.Queue[Any] = queue.Queue(1)
        self.commands = [build]  # ovsdbapp's TimeoutException reports these

    def do_commit(self) -> int:
        return self.store._commit(self.build, self.bump)


class _Wakeup:
    """A job that commits nothing: it only makes the connection thread run once more."""

    def __init__(self) -> None:
        self.results: queue.Queue[Any] = queue.Queue(1)
        self.commands: list[Any] = []

    def do_commit(self) -> None:
        return None


class Engine:
    """Owns the IDL and its thread; :class:`Store` adds the Portmesh operations on top."""

    def __init__(
        self, remote: str, timeout: float = 10.0, tables: Sequence[str] | None = None, host: str | None = None,
        reports: bool = True,
    ) -> None:
        """``tables``: replicate only these (default: all). A host agent needs neither the
        Mapping table nor its memory (~340 MB and ~7 s of loading at 100,000 mappings); reads
        and writes then concern those tables only.

        ``host``: the view of that host's agent (issue 12: its cost must grow with its own work,
        not with the cloud). Container rows are monitored only where ``host`` is that host
        (conditional monitoring: the server sends no other host's containers, nor their
        changes), all their columns (the agent reads the desired ones, ``running`` and its own
        status reports); Mapping rows only those with a health check, their desired columns and
        ``backend_health``; Host and Global rows all, but only their desired columns. The Host
        columns the agent writes (:data:`AGENT_WRITES`) are registered but not monitored, so
        other agents' and the controller's reports never wake it, and it can still write them.

        ``reports=False`` (a whole view, an eBPF host's agent): :data:`REPORT_COLUMNS` and
        :data:`HEARTBEAT_COLUMNS` are registered but not monitored (that agent writes its own, reads nobody's).
        """
        self.remote = remote
        self.timeout = timeout
        self.host = host
        install_stream_parser()  # the library's pure-Python JSON lexer was the largest cost of a write
        helper = ovs_idl.SchemaHelper(location=str(R.schema_path()))
        if tables is None and host is None:
            helper.register_all()
        if host is not None and tables is not None and "Container" in tables and "Mapping" not in tables:
            tables = (*tables, "Mapping")  # an agent's view always holds the checked mappings (its health checks)
        for table in tables or (() if host is None else AGENT_VIEW_TABLES):
            if host is not None and table in ("Global", "Host", "Mapping"):
                helper.register_columns(table, [*R.DESIRED_COLUMNS[table], *AGENT_WRITES.get(table, ())])
            else:
                helper.register_table(table)
        unmonitored = dict(AGENT_WRITES if host is not None else {})
        if not reports:
            for table, columns in (*REPORT_COLUMNS.items(), *HEARTBEAT_COLUMNS.items()):
                unmonitored[table] = tuple(dict.fromkeys((*unmonitored.get(table, ()), *columns)))
        where = {} if host is None else {"Container": [["host", "==", host]], "Mapping": AGENT_MAPPINGS}
        self._mirror = Mirror()
        # Host row -> the tunnel report last written through this client (report_tunnels), for an
        # agent's view that does not replicate the column it writes.
        self._reported_tunnels: dict[Any, dict[str, str]] = {}
        # Host row -> the traffic report (counters, drops) last written through this client (report_traffic).
        self._reported_traffic: dict[Any, tuple[dict[str, str], dict[str, int]]] = {}
        # Host row -> the datapath last written through this client with a heartbeat (report_heartbeat).
        self._reported_datapath: dict[Any, str] = {}
        self._idl = _Idl(remote, helper, self._after_run, self._on_row, self._on_reload, unmonitored, where)
        reconnect = getattr(getattr(self._idl, "_session", None), "reconnect", None)
        if reconnect is not None:
            reconnect.set_backoff(RECONNECT_BACKOFF_MS, RECONNECT_BACKOFF_MS)
        self._conn: ovs_conn.Connection | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._beat_watchers: list[Callable[[str, int], None]] = []
        self._notify_ready = False  # subscribers are told only from the connection thread, once started
        self._pending = False  # a change arrived that subscribers have not been told about
        self._in_txn = False  # never notify mid-commit: the cache then holds uncommitted rows

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Connect and load the whole database; subscribers are called once right after."""
        if self._conn is None:
            self._conn = ovs_conn.Connection(self._idl, timeout)
        try:
            self._conn.start()
        except ovsdbapp_exc.TimeoutException as exc:
            raise StoreError(f"store {self.remote} did not answer within {timeout} s") from exc
        self._notify_ready = True
        self._pending = True
        # Wake the thread so it tells subscribers about the initial load. A queued no-op, not a bare
        # alert_notify(): ovsdbapp clears the alert only when it dequeues a job, so a bare alert
        # kept the thread spinning at half a core forever.
        self._conn.queue_txn(_Wakeup())

    def close(self) -> None:
        """Stop the connection thread and drop the connection."""
        if self._conn is not None:
            self._notify_ready = False
            self._conn.stop(timeout=self.timeout)
            self._conn = None

    def __enter__(self) -> Self:
        self.start(self.timeout)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` from the IDL thread after each batch of changes (desired or status).

        Keep it short and never write from it (that would deadlock; it raises
        instead): set an event, or hand over to your loop with ``call_soon_threadsafe``,
        then read :meth:`snapshot`. Compare ``snapshot().generation`` to skip
        batches that only carried status reports.
        """
        self._callbacks.append(callback)

    def watch_heartbeats(self, callback: Callable[[str, int], None]) -> None:
        """Call ``callback(host, heartbeat)`` from the IDL thread on every notice of a Host row that holds a
        heartbeat (schema 1.9.0), and for every such row after a reload: the moment a beat arrives, so a
        reader times the agents' leases with its own clock. Only a view that monitors the column (the
        API's) ever calls it. Keep it short, as :meth:`subscribe`'s callbacks."""
        self._beat_watchers.append(callback)

    # -- internals: cache access (call with the connection lock held) ----------------------------

    def _lock(self) -> threading.RLock:
        if self._conn is None:
            raise StoreError("store client is not started")
        lock: threading.RLock = self._conn.lock
        return lock

    def _table(self, name: str) -> Any:
        return self._idl.tables[name]

    def _rows(self, table: str) -> list[Any]:
        return list(self._table(table).rows.values())

    def _row(self, table: str, row_uuid: Any) -> Any:
        """The IDL row with ``row_uuid`` (from the mirror), or None."""
        return None if row_uuid is None else self._table(table).rows.get(row_uuid)

    def _verify(self, row: Any, column: str) -> None:
        """Make the commit fail (TRY_AGAIN, then a rebuild on fresh data) if ``column`` of ``row`` changed,
        or the row went, since the cache read it.

        ``Row.verify`` alone is not enough: the Python IDL (ovs 4.0) records the prerequisite but
        sends a ``wait`` only for rows the transaction also writes, so a verified row must be
        entered among them (an entry without changes adds no update)."""
        row.verify(column)
        if row._data is not None:
            self._idl.txn._txn_rows[row.uuid] = row

    def _expect_none(self, txn: Txn, table: str, column: str, value: str) -> None:
        """Make the commit fail (TRY_AGAIN, then a rebuild on fresh data) if, once the transaction's
        own changes are applied, any ``table`` row still has ``column == value``.

        A raw ``wait`` (RFC 7047 §5.2.6, timeout 0), checked by the server at commit: it catches rows
        another client added since the cache was read, and only those, so unrelated writes never
        make it retry (verifying Global.generation did: 4 of 300 removes failed under a storm of
        creates)."""
        txn.add_op(
            {"op": "wait", "table": table, "timeout": 0, "where": [[column, "==", value]],
             "columns": [column], "until": "==", "rows": []}
        )

    def _generation(self) -> int:
        return self._mirror.generation

    # -- internals: the mirror (connection thread, lock held) ------------------------------------

    def _on_row(self, event: str, row: Any) -> None:
        self._mirror.apply(event, row._table.name, row)
        if self._beat_watchers and row._table.name == "Host" and event != "delete":
            self._tell_beat(row)

    def _on_reload(self) -> None:
        self._mirror.rebuild({name: list(table.rows.values()) for name, table in self._idl.tables.items()})
        if self._beat_watchers:
            for row in self._rows("Host"):
                self._tell_beat(row)

    def _tell_beat(self, row: Any) -> None:
        """Hand a Host row's heartbeat to the watchers (every notice of the row: they keep the last value)."""
        data = row._data
        if data is None or dict.get(data, "heartbeat") is None:
            return  # not replicated by this view (dict.get: the IDL's dict makes up defaults otherwise)
        committed = Committed(row)
        name, beat = str(committed.name), int(committed.heartbeat)
        for watch in list(self._beat_watchers):
            try:
                watch(name, beat)
            except Exception:
                LOG.exception("heartbeat watcher %r failed", watch)

    # -- internals: notification and commit (connection thread) ----------------------------------

    def _after_run(self, changed: bool) -> None:
        self._pending = self._pending or changed
        self._notify()

    def _notify(self) -> None:
        if not (self._pending and self._notify_ready) or self._in_txn:
            return
        if self._conn is None or threading.current_thread() is not self._conn.thread:
            return
        self._pending = False
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:
                LOG.exception("store subscriber %r failed", callback)

    def _write(self, build: Build, bump: bool = True) -> int:
        conn = self._conn
        if conn is None:
            raise StoreError("store client is not started")
        if threading.current_thread() is conn.thread:
            raise StoreError("writes from a subscribe callback would deadlock the IDL thread")
        job = _Job(self, build, bump)
        try:
            conn.queue_txn(job)
            result = job.results.get(timeout=self.timeout + 5)
        except (ovsdbapp_exc.TimeoutException, queue.Empty) as exc:
            raise StoreError(f"store {self.remote} did not take the write within {self.timeout} s") from exc
        if isinstance(result, idlutils.ExceptionResult):
            raise result.ex
        return int(result)

    def _commit(self, build: Build, bump: bool) -> int:
        """Build and commit in the connection thread, retrying TRY_AGAIN a bounded number of times."""
        deadline = time.monotonic() + self.timeout
        self._in_txn = True
        try:
            attempts = 0
            while attempts < MAX_ATTEMPTS:
                # Only an attempt the server saw counts: while the IDL is not monitoring (a Raft leader
                # lost, a reconnect under way) every commit is TRY_AGAIN at once, and under load an
                # election outlasted 20 such non-attempts (the deadline still bounds the wait).
                if self._idl.state == ovs_idl.Idl.IDL_S_MONITORING:
                    attempts += 1
                seqno = self._idl.change_seqno
                txn = ovs_idl.Transaction(self._idl)
                try:
                    if not build(txn):
                        txn.abort()
                        return self._generation()
                    inserted = self._bump(txn) if bump else False
                except BaseException:
                    txn.abort()
                    raise
                status = txn.commit_block()
                if status in (txn.SUCCESS, txn.UNCHANGED):
                    if not bump:
                        return self._generation()
                    generation = 1 if inserted else int(txn.get_increment_new_value())
                    self._await_generation(generation, deadline)
                    return generation
                error = txn.get_error()
                if status == txn.ERROR and not R.is_max_rows_violation(error, "Global"):
                    raise R.error_from_commit(error) or StoreError(f"commit failed: {error}")
                if status not in (txn.TRY_AGAIN, txn.ERROR):
                    raise StoreError(f"commit failed: {error}")
                if not self._wait_for_change(seqno, deadline):
                    break
            raise StoreError(f"commit to {self.remote} did not go through (TRY_AGAIN until the retry bound)")
        finally:
            self._in_txn = False
            self._notify()

    def _bump(self, txn: Txn) -> bool:
        """Increment Global.generation in ``txn``; True if the Global row had to be created."""
        rows = self._rows("Global")
        if rows and rows[0]._data is None:
            return True  # inserted by this very transaction (set_config on a database without one)
        if rows:
            rows[0].increment("generation")
            return False
        self._insert_global(txn)
        return True

    def _insert_global(self, txn: Txn) -> R.Row:
        """The Global row of a database created without one (``create_db`` makes it): generation 1 and
        the default configuration, so that its columns never read as "no pools"."""
        row = txn.insert(self._idl.tables["Global"])
        row.generation = 1
        R.fill_config(row, DEFAULT_CONFIG)
        return row

    def _wait_for_change(self, seqno: int, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            idlutils.wait_for_change(self._idl, remaining, seqno)
        except ovsdbapp_exc.TimeoutException:
            return False
        return True

    def _await_generation(self, generation: int, deadline: float) -> None:
        """Read-your-writes: return only once the cache holds what was just committed."""
        while self._generation() < generation and self._wait_for_change(self._idl.change_seqno, deadline):
            pass
