"""A read-only replica of the desired state over a raw OVSDB monitor: what the controller reads.

The IDL behind :class:`portmesh.store.client.Store` keeps every row as the OVS
library models it (a Row, a Datum and an Atom per column, each with its own
dictionaries): ~200 MB and ~6 s of loading at 100,000 mappings, measured, on top
of the desired state the controller actually uses. The controller needs nothing
but that state, so :class:`StateReader` asks the server to monitor only the
desired columns (:data:`portmesh.store.rows.DESIRED_COLUMNS`) and turns each row
update straight into model values through the same :class:`Mirror` the IDL
client uses; nothing else is kept. Status columns are not monitored, so the
controller's own status reports never wake it up.

The controller's one kind of write (the generation its switch realised) goes
over the same session as a one-operation transaction, so the controller needs
no IDL at all. Like the IDL with ``leader_only``, the reader talks to a Raft
cluster's leader only: it watches ``_Server.Database`` and moves on to the next
remote when the server it is on is not (or stops being) the connected leader.

After a reconnection (a server restart, a Raft leader change) the reader resumes
with ``monitor_cond_since`` from the last transaction id it saw: the server
answers ``found=true`` and sends only what changed since, or ``found=false`` (it
does not know the id: a standalone server keeps no transaction history, a Raft
member at most its last 100 transactions and no more atoms than the database
holds) and sends everything, which replaces the replica.
Either answer is applied under the lock in one piece, so a snapshot is the state
before the resume or after it, never a mix; until the answer comes, snapshots are
the last state seen. Updates then come as ``update3`` diffs, applied through
:class:`portmesh.store.update2.RowCache`. A server without ``monitor_cond_since``
(before 2.12) gets plain ``monitor`` and a full load on every reconnection.

Leader election (controller high availability): given a ``lock`` name, the reader
also takes that OVSDB lock on its session and watches ``Global.controller_epoch``/
``controller_master``, through the :class:`portmesh.store.election.Election` it owns
(see that module for why the lock shares the session with the status writes).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # ovs.poller's eventlet-detection banner (see engine.py)
    import ovs.jsonrpc
    import ovs.poller

from portmesh.model.entities import DesiredState, MappingCounters, MappingKey
from portmesh.model.errors import NotFound
from portmesh.store import rows as R
from portmesh.store.columns import ATOM, MAP, SET, JsonColumns, TupleColumns, column_kinds, decode
from portmesh.store.election import Election
from portmesh.store.engine import RECONNECT_BACKOFF_MS, StoreError
from portmesh.store.jsonstream import install as install_stream_parser
from portmesh.store.mirror import Mirror
from portmesh.store.update2 import ZERO_UUID, RowCache, default_value

# The column helpers moved to columns.py; their names stay importable from here.
__all__ = ["ATOM", "MAP", "SET", "JsonColumns", "StateReader", "TupleColumns", "column_kinds", "decode"]

log = logging.getLogger(__name__)

# What the server says when a JSON-RPC method is unknown to it.
UNKNOWN_METHOD = "unknown method"
SERVER_MONITOR = "server"
DESIRED_MONITOR = "desired"
# How often the thread looks at request deadlines when nothing else happens.
TICK_MS = 200


@dataclass
class _Request:
    """A transaction handed to the reader thread; the caller waits on ``done``."""

    ops: list[dict[str, Any]]
    deadline: float
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: str | None = None


class StateReader:
    """Desired state in, switch status out; thread-safe. See the module docstring.

    ``remote`` is ``unix:/path``, ``tcp:ip:port`` or a comma-separated list of
    those (a Raft cluster).
    """

    def __init__(self, remote: str, timeout: float = 10.0, lock: str | None = None) -> None:
        install_stream_parser()
        self.remote = remote
        self.timeout = timeout
        self._remotes = [r.strip() for r in remote.split(",") if r.strip()]
        schema = json.loads(R.schema_path().read_text())
        self._kinds = column_kinds(schema, R.DESIRED_COLUMNS)
        defaults = {
            table: {c: default_value(schema["tables"][table]["columns"][c]["type"], k) for c, k in kinds.items()}
            for table, kinds in self._kinds.items()
        }
        # Whole rows, for applying update2 diffs; the last transaction id seen (resume point);
        # whether the server has monitor_cond_since (False after it said "unknown method").
        single = {
            table: {
                c for c, k in kinds.items()
                if k != ATOM and schema["tables"][table]["columns"][c]["type"].get("max", 1) == 1
            }
            for table, kinds in self._kinds.items()
        }
        self._rows = RowCache(self._kinds, defaults, single)
        self._last_txn_id = ZERO_UUID
        self._since = True
        # How the desired state was (re)loaded on each connection, and how many rows the loads brought.
        self._stats = {"full_loads": 0, "resumes": 0, "rows_loaded": 0, "last_load_ms": 0}
        self._monitor_sent = 0.0
        self._mirror = Mirror()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._loaded = threading.Event()
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stopping = False
        self._failure: Exception | None = None
        # Reader-thread state: whether the desired monitor is set up on the current connection,
        # the ids of the two monitor requests in flight, and the transactions sent or waiting.
        self._ready = False
        self._server_id: Any = None
        self._monitor_id: Any = None
        self._sent: dict[Any, _Request] = {}
        self._outbox: list[_Request] = []
        # report_counters: what this reader last wrote, by mapping (written only when it changes;
        # forgotten when the lock changes hands: another master may have written counters meanwhile).
        self._counters_written: dict[MappingKey, MappingCounters] = {}
        # Leader election (see the module docstring): the lock's name, and the rest in its own object.
        self.lock = lock
        self._election = Election(lock, self._transact, self._wake, self._forget_counters)
        self._thread = threading.Thread(target=self._run, name="portmesh-store-reader", daemon=True)

    # -- caller side ------------------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> None:
        """Connect and load the desired state; subscribers are told once it is loaded."""
        wait = self.timeout if timeout is None else timeout
        self._thread.start()
        if not self._loaded.wait(wait):
            raise StoreError(f"store {self.remote} did not answer within {wait} s")

    def close(self) -> None:
        """Stop the thread; requests still waiting fail with StoreError."""
        self._stopping = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(self.timeout)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` from the reader thread after each batch of desired-state changes."""
        self._callbacks.append(callback)

    def snapshot(self) -> DesiredState:
        """A consistent copy of the desired state, including its generation."""
        if self._failure is not None:
            raise StoreError(f"store reader stopped on an error: {self._failure!r}")
        with self._lock:
            return self._mirror.state()

    def stats(self) -> dict[str, int]:
        """``full_loads``/``resumes``: connections that reloaded everything / resumed from the last
        transaction id; ``rows_loaded``: rows the server sent in those answers; ``last_load_ms``: the
        last one's time from request to applied (for tests and bench)."""
        with self._lock:
            return dict(self._stats)

    # -- leader election (only with a ``lock``) ---------------------------------------------------

    def on_election(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` from the reader thread when the lock is won or lost, or Global's
        controller epoch/master changes; it then reads :meth:`lock_held` and :meth:`leader`."""
        self._election.subscribe(callback)

    def lock_held(self) -> bool:
        """Whether the server has granted us the lock on the current connection."""
        return self._election.held()

    def leader(self) -> tuple[int, str]:
        """``(controller_epoch, controller_master)`` as the store last said."""
        return self._election.leader()

    def claim_epoch(self, name: str, above: int = 0) -> int:
        """Increment ``Global.controller_epoch`` (past ``above``, if given) and name ``name`` master,
        asserting the lock; the new epoch. StoreError if the lock is not ours: see :meth:`Election.claim_epoch`."""
        return self._election.claim_epoch(name, above)

    def relinquish(self) -> None:
        """Give the lock up (if held) and queue for it again: a master that found a newer one."""
        self._election.relinquish()

    def report_switch(self, host: str, generation: int, connected: bool, waiting: Collection[str] = ()) -> None:
        """Controller: the generation the host's switch has realised, whether it is connected, and the
        containers whose flows still wait for their port (see :class:`HostStatus`)."""
        op = {
            "op": "update",
            "table": "Host",
            "where": [["name", "==", host]],
            "row": {
                "switch_generation": generation,
                "switch_connected": connected,
                "switch_waiting": ["set", sorted(waiting)],
            },
        }
        # With a lock, only its holder writes status: a master that lost it fails here ("not owner").
        asserted = [{"op": "assert", "lock": self.lock}] if self.lock is not None else []
        result = self._transact([*asserted, op])[-1]
        if result.get("count", 0) == 0:
            raise NotFound("host", f"host {host!r} does not exist")

    def report_counters(self, counters: Mapping[MappingKey, MappingCounters]) -> int:
        """Master controller: the mappings' counters (summed over every switch); the rows written.
        Only rows that differ from what this reader last wrote (forgotten when the lock changes hands),
        in one transaction asserting the lock like :meth:`report_switch`; unmapped keys are skipped."""
        if self.lock is None:
            raise StoreError("report_counters needs a reader made with a lock")
        with self._lock:
            rows = self._mirror.mapping_rows
            changed = {
                key: value for key, value in counters.items()
                if key in rows and self._counters_written.get(key) != value
            }
            ops = [R.counters_update(str(rows[key]), value) for key, value in changed.items()]
        if not ops:
            return 0
        self._transact([{"op": "assert", "lock": self.lock}, *ops])
        self._counters_written.update(changed)
        return len(ops)

    def _transact(self, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if threading.current_thread() is self._thread:
            raise StoreError("writes from a subscribe callback would deadlock the reader thread")
        if self._stopping or not self._thread.is_alive():
            raise StoreError("store reader is not running")
        request = _Request(ops, time.monotonic() + self.timeout)
        self._requests.put(request)
        self._wake()
        request.done.wait(self.timeout + 5)
        if request.error is not None or not request.done.is_set():
            raise StoreError(f"transaction on {self.remote} failed: {request.error or 'no answer'}")
        results: list[dict[str, Any]] = request.result
        for result in results:
            if isinstance(result, dict) and "error" in result:
                raise StoreError(f"transaction on {self.remote} failed: {result['error']}: {result.get('details', '')}")
        return results

    def _wake(self) -> None:
        # A full pipe means a wake-up is pending anyway; a closed one, that we are stopping.
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    # -- reader thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        session = ovs.jsonrpc.Session.open_multiple(self._remotes)
        session.reconnect.set_backoff(RECONNECT_BACKOFF_MS, RECONNECT_BACKOFF_MS)
        # The session's seqno changes on connect and disconnect, but is not ordered with
        # is_connected(): track both, so a connection that completes later is not missed.
        seen: tuple[int, bool] = (-1, False)
        try:
            while not self._stopping:
                session.run()
                now = (session.get_seqno(), session.is_connected())
                if now != seen:
                    seen = now
                    self._on_new_connection(session)
                changed = False
                for _ in range(10_000):  # bounded: let the rest of the loop run under a flood of updates
                    msg = session.recv()
                    if msg is None:
                        break
                    changed |= self._handle(session, msg)
                if changed:
                    self._notify()
                self._take_requests()
                self._election.requeue_if_asked(session, self._ready)
                self._send_outbox(session)
                self._expire()
                poller = ovs.poller.Poller()
                session.wait(poller)
                session.recv_wait(poller)
                poller.fd_wait(self._wake_r, ovs.poller.POLLIN)
                poller.timer_wait(TICK_MS)
                poller.block()
                self._drain_wakeups()
        except Exception as exc:
            # Fail loudly: the next snapshot() raises (a silent stale replica would be worse).
            log.exception("store reader thread failed")
            self._failure = exc
            self._notify()
        finally:
            self._election.set_held(False)
            session.close()
            for request in [*self._sent.values(), *self._outbox, *self._drain_requests()]:
                request.error = "store reader stopped"
                request.done.set()

    def _on_new_connection(self, session: Any) -> None:
        """Connected (or lost): first make sure this server may be read, then monitor."""
        self._ready = False
        self._outbox[:0] = self._sent.values()  # unanswered on the old connection: send again
        self._sent.clear()
        self._election.new_connection()
        if session.is_connected():
            request = ovs.jsonrpc.Message.create_request(
                "monitor", ["_Server", SERVER_MONITOR, {"Database": {"columns": ["name", "model", "connected", "leader"]}}]
            )
            self._server_id = request.id
            session.send(request)

    def _handle(self, session: Any, msg: Any) -> bool:
        """One message; True if the desired state changed."""
        Message = ovs.jsonrpc.Message
        if self._election.handle(session, msg):
            return False
        if msg.type == Message.T_NOTIFY and msg.method == "update" and len(msg.params) == 2:
            monitor, updates = msg.params
            if monitor == SERVER_MONITOR:
                if self._usable(updates) is False:  # None: this update is about another database
                    log.info("store %s: no longer the connected leader, moving on", session.reconnect.get_name())
                    session.force_reconnect()
                return False
            if monitor == DESIRED_MONITOR:
                with self._lock:
                    self._apply(updates)
                return True
            return False
        if msg.type == Message.T_NOTIFY and msg.method == "update3" and len(msg.params) == 3:
            monitor, last_txn_id, updates = msg.params
            if monitor != DESIRED_MONITOR:
                return False
            with self._lock:
                self._apply2(updates)
                self._last_txn_id = last_txn_id
            return True
        if msg.type not in (Message.T_REPLY, Message.T_ERROR):
            return False
        if msg.id == self._server_id:
            self._server_id = None
            # An error: a server without the _Server database (older than 2.9) is standalone.
            if msg.type == Message.T_REPLY and self._usable(msg.result) is False:
                log.info("store %s is not the connected leader, trying the next remote", session.reconnect.get_name())
                session.force_reconnect()
                return False
            self._send_monitor(session)
            return False
        if msg.id == self._monitor_id:
            self._monitor_id = None
            if msg.type == Message.T_ERROR:
                if self._since and UNKNOWN_METHOD in str(msg.error):
                    log.info("store %s has no monitor_cond_since: full loads", session.reconnect.get_name())
                    self._since = False
                    self._send_monitor(session)
                    return False
                log.error("store %s refused the monitor: %s", session.reconnect.get_name(), msg.error)
                session.force_reconnect()
                return False
            with self._lock:
                if self._since:
                    found, last_txn_id, updates = msg.result
                    if not found:
                        self._mirror.reset()
                        self._rows.clear()
                    self._apply2(updates)
                    self._last_txn_id = last_txn_id
                else:
                    found, updates = False, msg.result
                    self._mirror.reset()
                    self._apply(updates)
                self._stats["resumes" if found else "full_loads"] += 1
                self._stats["rows_loaded"] += sum(len(rows) for rows in updates.values())
                self._stats["last_load_ms"] = round((time.monotonic() - self._monitor_sent) * 1000)
            log.info(
                "store %s: %s", session.reconnect.get_name(),
                f"resumed from {self._last_txn_id}" if found else "loaded the whole desired state",
            )
            self._ready = True
            self._loaded.set()
            return True
        request = self._sent.pop(msg.id, None)
        if request is not None:
            if msg.type == Message.T_ERROR:
                request.error = str(msg.error)
            request.result = msg.result
            request.done.set()
        return False

    @staticmethod
    def _usable(updates: dict[str, Any]) -> bool | None:
        """Is the Portmesh database here readable (standalone, or this is the connected Raft leader)?
        None when ``updates`` says nothing about it (an update may carry other databases' rows only)."""
        for change in updates.get("Database", {}).values():
            row = change.get("new")
            if row is None or row.get("name") != R.SCHEMA_NAME:
                continue
            if row.get("model") != "clustered":
                return True
            return bool(row.get("connected")) and bool(row.get("leader"))
        return None

    def _send_monitor(self, session: Any) -> None:
        """Monitor the desired columns: resume from the last transaction id, if the server can."""
        if self._since:
            since = {table: [{"columns": list(names)}] for table, names in R.DESIRED_COLUMNS.items()}
            params = [R.SCHEMA_NAME, DESIRED_MONITOR, since, self._last_txn_id]
            request = ovs.jsonrpc.Message.create_request("monitor_cond_since", params)
        else:
            columns = {table: {"columns": list(names)} for table, names in R.DESIRED_COLUMNS.items()}
            request = ovs.jsonrpc.Message.create_request("monitor", [R.SCHEMA_NAME, DESIRED_MONITOR, columns])
        self._monitor_id = request.id
        self._monitor_sent = time.monotonic()
        session.send(request)
        self._election.request(session)

    def _forget_counters(self) -> None:
        """The lock changed hands: another master may have written counters meanwhile."""
        self._counters_written = {}

    def _apply2(self, updates: dict[str, Any]) -> None:
        """Apply ``table-updates2`` (initial/insert/modify/delete) through the row cache.

        A plain Mapping row (its schema 1.6.0 columns all empty: what nearly every row of a large
        cloud is) is built straight from its four atoms: the policy columns then cost one
        comparison each, and a 100,000-mapping load costs what it did before they existed."""
        mirror, cache = self._mirror, self._rows
        for table, rows in updates.items():
            kinds, index = self._kinds[table], cache.index(table)
            if table == "Mapping":
                base = tuple(index[c] for c in ("public_ip", "proto", "port", "container"))
                policy = tuple((i, default) for c, i in index.items() if i not in base
                               for default in (cache.default(table, c),))
            for row_uuid, change in rows.items():
                new = cache.change(table, row_uuid, change)
                if table == "Mapping" and new is not None and all(new[i] == d for i, d in policy):
                    ip, proto, port, container = (new[i] for i in base)
                    mirror.put_mapping(row_uuid, R.plain_mapping(ip, proto, port, container))
                    continue
                mirror.apply_columns(table, row_uuid, None if new is None else TupleColumns(new, kinds, index))

    def _apply(self, updates: dict[str, Any]) -> None:
        """Apply monitor table-updates (RFC 7047 §4.1.6: "new" holds every monitored column)."""
        mirror = self._mirror
        for table, rows in updates.items():
            kinds = self._kinds[table]
            for row_uuid, change in rows.items():
                new = change.get("new")
                mirror.apply_columns(table, row_uuid, None if new is None else JsonColumns(new, kinds))

    def _notify(self) -> None:
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:
                log.exception("store subscriber %r failed", callback)

    def _drain_requests(self) -> list[_Request]:
        out = []
        while True:
            try:
                out.append(self._requests.get_nowait())
            except queue.Empty:
                return out

    def _take_requests(self) -> None:
        self._outbox.extend(self._drain_requests())

    def _send_outbox(self, session: Any) -> None:
        if not self._ready:
            return
        while self._outbox:
            request = self._outbox[0]
            msg = ovs.jsonrpc.Message.create_request("transact", [R.SCHEMA_NAME, *request.ops])
            error = session.send(msg)
            if error and error != errno.EAGAIN:
                return  # the connection is going; _on_new_connection re-queues
            self._outbox.pop(0)
            self._sent[msg.id] = request

    def _expire(self) -> None:
        now = time.monotonic()
        for pool in (self._outbox, list(self._sent.values())):
            for request in pool:
                if request.deadline < now and not request.done.is_set():
                    request.error = f"no answer within {self.timeout} s"
                    request.done.set()
        self._outbox = [r for r in self._outbox if not r.done.is_set()]
        self._sent = {k: r for k, r in self._sent.items() if not r.done.is_set()}

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
