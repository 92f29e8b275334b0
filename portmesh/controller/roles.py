"""OpenFlow 1.3 controller roles for two (or more) controller instances: who may write.

Every instance connects to every switch. The one holding the store's lock (see
:mod:`portmesh.store.reader`) is master: it asks each switch for role MASTER
with generation id = the epoch it claimed from the store, which only grows. The
others ask for SLAVE. A switch refuses a role request whose generation id is
older than the newest it has seen (OFPRRFC_STALE) and, when a controller becomes
MASTER, turns the previous master into a slave, which then gets IS_SLAVE for
every write. Both answers mean "a newer master exists": the instance stops
writing and goes standby, so a frozen old master that wakes up cannot churn flows.

The pieces here are pure (what to do given the lock and our role; how a switch
compares generation ids; which errors mean "not master") plus the request itself.
"""

from __future__ import annotations

import enum
from typing import Any

from portmesh.controller.connection import OpenFlowConnection, SwitchError
from portmesh.controller.encoding import DP, ofp, parser, serialize

# Generation ids are compared the way the switch does (OpenFlow 1.3 §6.3.5, OVS ofconn_set_master_election_id):
# as a signed 64-bit difference, so the sequence may wrap.
GENERATION_BITS = 64
_MASK = (1 << GENERATION_BITS) - 1


class Role(enum.IntEnum):
    """The roles this controller asks for (OFPCR_ROLE_*)."""

    MASTER = ofp.OFPCR_ROLE_MASTER
    SLAVE = ofp.OFPCR_ROLE_SLAVE


class Step(enum.Enum):
    """What the election loop does next, given the lock and the role it plays now."""

    CLAIM = "claim"  # we hold the lock but are not master yet: claim an epoch, then MASTER everywhere
    RESIGN = "resign"  # we are master without the lock: stop writing at once, SLAVE everywhere
    STAY = "stay"  # nothing changes


def next_step(is_master: bool, lock_held: bool) -> Step:
    """The only two transitions: lock without mastership -> claim; mastership without lock -> resign."""
    if lock_held and not is_master:
        return Step.CLAIM
    if is_master and not lock_held:
        return Step.RESIGN
    return Step.STAY


def is_stale(generation_id: int, newest: int) -> bool:
    """Would a switch that has seen ``newest`` refuse ``generation_id`` as stale (older)?"""
    return ((generation_id - newest) & _MASK) >= (1 << (GENERATION_BITS - 1))


def says_newer_master(exc: BaseException) -> bool:
    """Does this switch error mean another controller is master with a newer generation id?"""
    if not isinstance(exc, SwitchError):
        return False
    return (exc.type, exc.code) in (
        (ofp.OFPET_ROLE_REQUEST_FAILED, ofp.OFPRRFC_STALE),
        (ofp.OFPET_BAD_REQUEST, ofp.OFPBRC_IS_SLAVE),
    )


def error_says_newer_master(msg: Any) -> bool:
    """The same for an unsolicited OFPT_ERROR message (e.g. a bundle-add refused to a slave)."""
    return (msg.type, msg.code) in (
        (ofp.OFPET_ROLE_REQUEST_FAILED, ofp.OFPRRFC_STALE),
        (ofp.OFPET_BAD_REQUEST, ofp.OFPBRC_IS_SLAVE),
    )


async def request_role(conn: OpenFlowConnection, role: Role, generation_id: int, timeout: float = 5.0) -> int:
    """Ask the switch for ``role`` with ``generation_id``; return the role it answers.

    Raises :class:`SwitchError` (see :func:`says_newer_master`) when it refuses.
    """
    return (await _role_request(conn, int(role), generation_id, timeout))[0]


async def switch_generation(conn: OpenFlowConnection, timeout: float = 5.0) -> int:
    """The newest generation id the switch has seen (a NOCHANGE role request asks without changing anything)."""
    return (await _role_request(conn, ofp.OFPCR_ROLE_NOCHANGE, 0, timeout))[1]


async def _role_request(conn: OpenFlowConnection, role: int, generation_id: int, timeout: float) -> tuple[int, int]:
    xid = conn.next_xid()
    msg = parser.OFPRoleRequest(DP, role, generation_id & _MASK)
    (reply, *_) = await conn.request_bytes(serialize(msg, xid), xid, timeout)
    return int(reply.role), int(reply.generation_id)
