"""One OpenFlow 1.3 connection to a switch, on asyncio streams.

Framing is done here (an OpenFlow header carries the message length); decoding
and encoding are os-ken's. Requests that expect an answer (features, multipart,
bundle control, barrier) get a future keyed by xid; everything the switch sends
on its own (packet-in, port-status, errors without a waiter) goes to a handler.

A switch that stops answering (frozen, its host gone, a cable pulled) does not
close its TCP connection, so :meth:`OpenFlowConnection.keepalive` probes it with
ECHO_REQUEST after a quiet spell and aborts the connection when nothing comes
back, which the controller then handles exactly like a TCP error.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from os_ken.ofproto import ofproto_parser

from portmesh.controller.encoding import DP, bundle_ctrl, ofp, parser, serialize

log = logging.getLogger(__name__)

HEADER = struct.Struct("!BBHI")
REPLY_TIMEOUT_S = 30.0
# os-ken's own layouts for the one message read in bulk (see FlowCookies).
MULTIPART_REPLY = struct.Struct("!" + ofp.OFP_MULTIPART_REPLY_PACK_STR.lstrip("!"))
FLOW_STATS_0 = struct.Struct(ofp.OFP_FLOW_STATS_0_PACK_STR)


@dataclass
class FlowCookies:
    """A flow-stats multipart reply reduced to its cookies.

    Reading a switch's 200,000 flows back through os-ken's full parser costs
    seconds (every match and instruction becomes objects), and the controller
    needs only the cookies: a cookie names a flow's content. So this one reply is
    read with os-ken's own struct layouts (OFP_MULTIPART_REPLY / OFP_FLOW_STATS_0),
    and a test checks the result against os-ken's full parse.
    """

    msg_type: int
    xid: int
    flags: int
    cookies: list[int]


# Tables whose flows are the switch's own and never the controller's to diff. None since AFFINITY's
# connections moved into conntrack (balancing.py): the controller programs every table it reads.
UNREAD_TABLES: frozenset[int] = frozenset()


def flow_cookies(data: bytes, xid: int) -> FlowCookies:
    """The cookies of every flow-stats entry in a raw multipart reply, but for UNREAD_TABLES."""
    _type, flags = MULTIPART_REPLY.unpack_from(data, HEADER.size)
    cookies = []
    offset = HEADER.size + MULTIPART_REPLY.size
    while offset < len(data):
        entry = FLOW_STATS_0.unpack_from(data, offset)
        length, table_id, cookie = entry[0], entry[1], entry[8]
        if length < FLOW_STATS_0.size:
            raise ValueError(f"flow-stats entry of length {length} at offset {offset}")
        if table_id not in UNREAD_TABLES:
            cookies.append(cookie)
        offset += length
    return FlowCookies(ofp.OFPT_MULTIPART_REPLY, xid, flags, cookies)


class SwitchError(RuntimeError):
    """The switch answered a request with an OpenFlow error (its type and code kept for callers that care)."""

    def __init__(self, text: str, type_: int = -1, code: int = -1) -> None:
        super().__init__(text)
        self.type = type_
        self.code = code


Handler = Callable[[Any], Awaitable[None]]


class OpenFlowConnection:
    """Framing, xid bookkeeping and request/reply for one switch."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._xids = itertools.count(1)
        self._waiters: dict[int, asyncio.Future[list[Any]]] = {}
        self._parts: dict[int, list[Any]] = {}
        self._cookie_xids: set[int] = set()
        self.datapath_id = 0
        self.peer = str(writer.get_extra_info("peername") or "?")
        self.last_heard = time.monotonic()  # when the switch last sent a whole message

    async def handshake(self) -> int:
        """Exchange HELLO and FEATURES; returns the datapath id."""
        self.send(serialize(parser.OFPHello(DP), 0))
        hello = await self._read_message()
        if hello is None or hello.msg_type != ofp.OFPT_HELLO:
            raise ConnectionError(f"{self.peer}: expected HELLO, got {hello!r}")
        if hello.version < ofp.OFP_VERSION:
            raise ConnectionError(f"{self.peer}: switch speaks OpenFlow version {hello.version}, 1.3 needed")
        xid = next(self._xids)
        self.send(serialize(parser.OFPFeaturesRequest(DP), xid))
        while True:
            msg = await self._read_message()
            if msg is not None and msg.msg_type == ofp.OFPT_FEATURES_REPLY and msg.xid == xid:
                self.datapath_id = int(msg.datapath_id)
                return self.datapath_id
            if msg is not None and msg.msg_type == ofp.OFPT_ECHO_REQUEST:
                self.send(serialize(parser.OFPEchoReply(DP, data=msg.data), msg.xid))

    def send(self, data: bytes) -> None:
        self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()

    def next_xid(self) -> int:
        return next(self._xids)

    async def request(self, msg: Any) -> list[Any]:
        """Send ``msg`` and return its reply (all parts of a multipart reply)."""
        xid = self.next_xid()
        return await self.request_bytes(serialize(msg, xid), xid)

    async def request_bytes(self, data: bytes, xid: int, timeout: float = REPLY_TIMEOUT_S) -> list[Any]:
        """Send pre-encoded bytes carrying ``xid`` and wait for the reply with that xid."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._waiters[xid] = future
        self.send(data)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiters.pop(xid, None)

    async def barrier(self) -> None:
        await self.request(parser.OFPBarrierRequest(DP))

    async def send_checked(self, msg: Any) -> None:
        """Send a message that has no reply (a meter-mod); a barrier tells whether the switch refused it."""
        xid = self.next_xid()
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._waiters[xid] = future
        try:
            self.send(serialize(msg, xid))
            await self.barrier()  # the switch answers in order: an error for ``msg`` comes before this reply
            if future.done():
                future.result()  # raises the SwitchError
        finally:
            self._waiters.pop(xid, None)

    async def bundle_ctrl(self, type_: int) -> None:
        xid = self.next_xid()
        await self.request_bytes(bundle_ctrl(type_, xid), xid)

    async def serve(self, on_async: Handler) -> None:
        """Read until the switch goes away, dispatching replies and async messages."""
        while True:
            msg = await self._read_message()
            if msg is None:
                continue
            await self._dispatch(msg, on_async)

    async def _dispatch(self, msg: Any, on_async: Handler) -> None:
        if msg.msg_type == ofp.OFPT_ECHO_REQUEST:
            self.send(serialize(parser.OFPEchoReply(DP, data=msg.data), msg.xid))
            return
        waiter = self._waiters.get(msg.xid)
        if waiter is None or waiter.done():
            await on_async(msg)
            return
        if msg.msg_type == ofp.OFPT_ERROR:
            self._parts.pop(msg.xid, None)
            waiter.set_exception(SwitchError(describe_error(msg), msg.type, msg.code))
            return
        parts = self._parts.setdefault(msg.xid, [])
        parts.append(msg)
        if msg.msg_type == ofp.OFPT_MULTIPART_REPLY and msg.flags & ofp.OFPMPF_REPLY_MORE:
            return
        del self._parts[msg.xid]
        waiter.set_result(parts)

    async def _read_message(self) -> Any:
        header = await self._reader.readexactly(HEADER.size)
        version, msg_type, length, xid = HEADER.unpack(header)
        body = await self._reader.readexactly(length - HEADER.size)
        self.last_heard = time.monotonic()
        if msg_type == ofp.OFPT_MULTIPART_REPLY and xid in self._cookie_xids:
            return flow_cookies(header + body, xid)
        return ofproto_parser.msg(DP, version, msg_type, length, xid, header + body)

    async def flow_cookies(self) -> set[int]:
        """The cookies of every flow in every table (a flow-stats request read in bulk)."""
        xid = self.next_xid()
        self._cookie_xids.add(xid)
        try:
            replies = await self.request_bytes(serialize(parser.OFPFlowStatsRequest(DP, table_id=ofp.OFPTT_ALL), xid), xid)
        finally:
            self._cookie_xids.discard(xid)
        return {cookie for reply in replies for cookie in reply.cookies}

    async def keepalive(self, idle: float, timeout: float) -> None:
        """Probe a quiet switch; abort the connection when it stays silent.

        After ``idle`` seconds without a message from the switch, send an
        ECHO_REQUEST; if neither its reply nor anything else arrives within
        ``timeout`` seconds, the switch is taken for dead: the connection is
        aborted (not closed: a frozen peer never takes the unsent bytes a close
        would wait to flush), so the reader sees end-of-file and every waiting
        request fails, and the controller reports the switch disconnected as it
        does for a TCP error. Any message counts as a sign of life, so a switch
        busy sending replies is never probed. Returns only once it has aborted.
        """
        while True:
            quiet = time.monotonic() - self.last_heard
            if quiet < idle:
                await asyncio.sleep(idle - quiet)
                continue
            xid = self.next_xid()
            probe = serialize(parser.OFPEchoRequest(DP, data=b"portmesh"), xid)
            try:
                await self.request_bytes(probe, xid, timeout)
            except TimeoutError:
                if time.monotonic() - self.last_heard < timeout:
                    continue  # no echo reply, but other messages: alive, just slow to answer
                log.warning("switch %016x (%s): no reply to an echo request within %g s after %g s of silence; "
                            "dropping the connection", self.datapath_id, self.peer, timeout, idle)
                self.close(abort=True)
                return

    def close(self, abort: bool = False) -> None:
        """Fail every waiting request and close (or, with ``abort``, drop at once) the transport."""
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError("switch connection closed"))
        if abort:
            self._writer.transport.abort()
        else:
            self._writer.close()


def describe_error(msg: Any) -> str:
    """A readable OpenFlow error: type/code names when os-ken knows them."""
    try:
        names = ofp.ofp_error_to_jsondict(msg.type, msg.code)
        return f"OpenFlow error {names.get('type')}/{names.get('code')} for xid {msg.xid}"
    except (KeyError, AttributeError, ValueError):
        return f"OpenFlow error type={msg.type} code={msg.code} for xid {msg.xid}"
