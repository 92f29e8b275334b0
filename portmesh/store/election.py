"""Leader election for controller high availability: the lock and epoch half of :class:`StateReader`.

Given a ``lock`` name, the reader also asks the server for that OVSDB lock (RFC 7047
§4.1.8) on every connection, right after it knows the server is the one to talk to,
and watches ``Global.controller_epoch``/``controller_master``. The lock lives on the
same session as the status writes on purpose: each write then asserts the lock in its
own transaction, so a controller that lost it (its connection dropped, or a ``stolen``
notification) cannot write status or claim an epoch any more, even if it has not
noticed yet. In a Raft cluster a lock is held on the member the client is connected
to and is not replicated (checked with ovsdb-server 3.1: two clients on two members
both get the same lock), which is one more reason the reader talks to the leader only;
the epoch is unique regardless, because its increment is a Raft transaction (two
increments from the same value conflict). ovsdb-server releases a lock when its
holder's connection dies, so a ``kill -9`` of the holder hands the lock to the next
waiter at once.

:class:`Election` keeps that state apart from the reader's replica and transaction
plumbing: the reader owns one, feeds it the session's messages from its thread and
lends it its transaction call for :meth:`Election.claim_epoch`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # ovs.poller's eventlet-detection banner (see engine.py)
    import ovs.jsonrpc

from portmesh.store import rows as R
from portmesh.store.columns import SET, decode
from portmesh.store.engine import StoreError

log = logging.getLogger(__name__)

LEADER_MONITOR = "leader"
# The Global columns naming the current controller master (schema 1.5.0).
LEADER_COLUMNS = ("controller_epoch", "controller_master")

# Runs a transaction's operations on the reader's session and returns their results (raises StoreError).
Transact = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]


class Election:
    """The lock's name, whether we hold it, the (epoch, master) last seen in Global, and who to tell.

    Everything but :meth:`claim_epoch`, :meth:`subscribe`, :meth:`held`, :meth:`leader` and
    :meth:`relinquish` runs on the reader thread. ``transact`` is the reader's own (it waits for
    the thread); ``wake`` wakes the thread; ``on_lock_change`` runs first whenever the lock is won
    or lost (the reader forgets what it wrote under the old holder).
    """

    def __init__(
        self, lock: str | None, transact: Transact, wake: Callable[[], None], on_lock_change: Callable[[], None]
    ) -> None:
        self.lock = lock
        self._transact = transact
        self._wake = wake
        self._on_lock_change = on_lock_change
        # Whether we hold the lock, the ids of the lock request and of the leader monitor in flight,
        # and ``_relock``: give the lock up and queue again (asked by relinquish, done by the thread).
        self._held = False
        self._lock_id: Any = None
        self._leader_id: Any = None
        self._leader: tuple[int, str] = (0, "")
        self._relock = False
        self._callbacks: list[Callable[[], None]] = []

    # -- caller side ------------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` from the reader thread when the lock is won or lost, or the epoch/master changes."""
        self._callbacks.append(callback)

    def held(self) -> bool:
        """Whether the server has granted us the lock on the current connection."""
        return self._held

    def leader(self) -> tuple[int, str]:
        """``(controller_epoch, controller_master)`` as the store last said."""
        return self._leader

    def claim_epoch(self, name: str, above: int = 0) -> int:
        """Increment ``Global.controller_epoch`` (to more than ``above``, if given) and name ``name``
        master, asserting the lock, in one transaction; return the new epoch. Raises StoreError when
        the lock is not ours (any more).

        ``above``: a generation id a switch has seen that the store's epoch does not exceed (the
        store was restored or recreated while the switches kept running): then the epoch jumps past
        it, guarded by a ``wait`` on the value read, so it still only grows and is never shared.
        """
        if self.lock is None:
            raise StoreError("claim_epoch needs a reader made with a lock")
        select = {"op": "select", "table": "Global", "where": [], "columns": ["controller_epoch"]}
        if above > 0:
            (found,) = self._transact([select])
            current = int(found["rows"][0]["controller_epoch"]) if found.get("rows") else 0
            change: list[dict[str, Any]] = [
                {"op": "wait", "table": "Global", "where": [], "columns": ["controller_epoch"], "until": "==",
                 "rows": [{"controller_epoch": current}], "timeout": 0},
                {"op": "update", "table": "Global", "where": [], "row": {"controller_epoch": max(current, above) + 1}},
            ]
        else:
            change = [{"op": "mutate", "table": "Global", "where": [], "mutations": [["controller_epoch", "+=", 1]]}]
        ops: list[dict[str, Any]] = [
            {"op": "assert", "lock": self.lock},
            *change,
            {"op": "update", "table": "Global", "where": [], "row": {"controller_master": name}},
            select,
        ]
        results = self._transact(ops)
        rows = results[-1].get("rows", [])
        if results[-3].get("count", 0) != 1 or len(rows) != 1:
            raise StoreError("the store has no Global row to hold the controller epoch")
        return int(rows[0]["controller_epoch"])

    def relinquish(self) -> None:
        """Give the lock up (if held) and queue for it again: a master that found a newer one."""
        self._relock = True
        self._wake()

    # -- reader thread ----------------------------------------------------------------------------

    def new_connection(self) -> None:
        """A lock belongs to a connection: a new one starts without it, and nothing is in flight."""
        self._lock_id = self._leader_id = None
        self.set_held(False)

    def request(self, session: Any) -> None:
        """Monitor the leader columns and ask for the lock (if we have one).

        Only once the server is known to be the one to talk to (the Raft leader): a lock taken
        on a follower would be a second, independent lock (see the module docstring)."""
        if self.lock is None:
            return
        leader = ovs.jsonrpc.Message.create_request(
            "monitor", [R.SCHEMA_NAME, LEADER_MONITOR, {"Global": {"columns": list(LEADER_COLUMNS)}}]
        )
        self._leader_id = leader.id
        session.send(leader)
        lock = ovs.jsonrpc.Message.create_request("lock", [self.lock])
        self._lock_id = lock.id
        session.send(lock)

    def requeue_if_asked(self, session: Any, ready: bool) -> None:
        """After :meth:`relinquish`: unlock and lock again, so the server hands the lock to the next
        waiter and queues us behind. ``ready``: the reader's monitor is set up on this connection."""
        if not self._relock:
            return
        self._relock = False
        if self.lock is None or not session.is_connected() or not ready:
            return
        session.send(ovs.jsonrpc.Message.create_request("unlock", [self.lock]))
        self.set_held(False)
        lock = ovs.jsonrpc.Message.create_request("lock", [self.lock])
        self._lock_id = lock.id
        session.send(lock)

    def handle(self, session: Any, msg: Any) -> bool:
        """Take ``msg`` if it is about the election (a lock notification or reply, the leader
        monitor's reply or update); True if it was."""
        Message = ovs.jsonrpc.Message
        if msg.type == Message.T_NOTIFY:
            if msg.method in ("locked", "stolen") and msg.params == [self.lock]:
                self.set_held(msg.method == "locked")
                return True
            if msg.method == "update" and len(msg.params) == 2 and msg.params[0] == LEADER_MONITOR:
                self._leader_update(msg.params[1])
                return True
            return False
        if msg.type not in (Message.T_REPLY, Message.T_ERROR):
            return False
        if self._lock_id is not None and msg.id == self._lock_id:
            self._lock_id = None
            if msg.type == Message.T_ERROR:
                log.error("store %s refused the lock %r: %s", session.reconnect.get_name(), self.lock, msg.error)
            else:
                self.set_held(bool(msg.result.get("locked")))
            return True
        if self._leader_id is not None and msg.id == self._leader_id:
            self._leader_id = None
            if msg.type == Message.T_ERROR:
                log.error("store %s refused the leader monitor (schema older than 1.5.0? run `python -m "
                          "portmesh.store upgrade`): %s", session.reconnect.get_name(), msg.error)
            else:
                self._leader_update(msg.result)
            return True
        return False

    def set_held(self, held: bool) -> None:
        """Record whether we hold the lock; on a change, tell the reader first, then the subscribers."""
        if held != self._held:
            self._held = held
            self._on_lock_change()
            log.info("store lock %r %s", self.lock, "acquired" if held else "not held")
            self._notify()

    def _leader_update(self, updates: dict[str, Any]) -> None:
        """Global's controller epoch and master, from the leader monitor's (initial) update."""
        for change in updates.get("Global", {}).values():
            row = change.get("new")
            if row is None:
                continue
            epoch = int(row.get("controller_epoch", self._leader[0]))
            master = decode(row.get("controller_master", ["set", []]), SET)
            leader = (epoch, str(master[0]) if master else "")
            if leader != self._leader:
                self._leader = leader
                self._notify()

    def _notify(self) -> None:
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:
                log.exception("election subscriber %r failed", callback)
