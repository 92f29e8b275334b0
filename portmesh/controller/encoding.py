"""Flow values → OpenFlow 1.3 wire bytes, through os-ken's parser/serializer.

os-ken is the single source of truth for the wire format; this module only
decides *what* to encode and keeps the result. Building and serializing one
FlowMod costs tens of microseconds, so each flow's bundle-add message is encoded
once and kept by cookie: a resync or a second switch re-uses the bytes. Every
cached message is encoded with bundle id :data:`BUNDLE_ID` and xid 0, which is
why one connection runs one bundle at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import os_ken.base.app_manager  # noqa: F401  (import order: avoids os-ken's circular import)
from os_ken.ofproto import nicira_ext
from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser

from portmesh.controller.flows import Action, Ct, Flow, Learn, Move, Multipath, Output, Resubmit, SetField, ToController
from portmesh.controller.templates import TemplateEncoder

__all__ = ["BUNDLE_ID", "DP", "EncodingCache", "bundle_add", "flow_mod_add", "flow_mod_delete", "ofp", "parser", "serialize"]

BUNDLE_ID = 1
BUNDLE_FLAGS = ofp.ONF_BF_ATOMIC | ofp.ONF_BF_ORDERED
ALL_COOKIE_BITS = 0xFFFFFFFFFFFFFFFF


class WireDatapath:
    """The minimum os-ken's message classes need from a 'datapath': protocol modules."""

    ofproto = ofp
    ofproto_parser = parser
    id = 0


DP = WireDatapath()


def _action(action: Action) -> Any:
    if isinstance(action, SetField):
        return parser.OFPActionSetField(**{action.field: action.value})
    if isinstance(action, Move):
        return parser.NXActionRegMove(src_field=action.src, dst_field=action.dst, n_bits=action.n_bits)
    if isinstance(action, Output):
        return parser.OFPActionOutput(action.port)
    if isinstance(action, ToController):
        return parser.OFPActionOutput(ofp.OFPP_CONTROLLER, action.max_len)
    if isinstance(action, Ct):
        label = [parser.NXActionRegMove(src_field=action.label_from, dst_field="ct_label", n_bits=48)]
        return parser.NXActionCT(
            flags=1 if action.commit else 0,  # NX_CT_F_COMMIT
            zone_src="", zone_ofs_nbits=action.zone,  # an immediate zone when zone_src is empty
            recirc_table=action.table.number if action.table is not None else 0xFF,  # NX_CT_RECIRC_NONE
            alg=0,
            actions=label if action.label_from else [],
        )
    if isinstance(action, Resubmit):
        return parser.NXActionResubmitTable(table_id=action.table.number)  # in_port: OF1.0 IN_PORT, unchanged
    if isinstance(action, Multipath):
        return parser.NXActionMultipath(
            fields=NX_HASH_FIELDS_SYMMETRIC_L3L4_UDP, basis=0, algorithm=nicira_ext.NX_MP_ALG_HRW,
            max_link=action.n_links - 1, arg=0, ofs_nbits=nicira_ext.ofs_nbits(0, 15), dst=action.dst,
        )
    if isinstance(action, Learn):
        return _learn(action)
    raise TypeError(f"unknown action {action!r}")


# OVS's nx_hash_fields value (not named in os-ken): IPv4 source and destination, protocol, TCP/UDP/SCTP
# ports, symmetric. Not symmetric_l4: that one hashes Ethernet addresses too (eth_dst is the learned
# backend's MAC when a SYN reuses a learned 5-tuple, so that SYN would hash apart from a fresh one) and
# leaves UDP ports out (every UDP flow of one client would land on one backend).
NX_HASH_FIELDS_SYMMETRIC_L3L4_UDP = 3


def _learn(action: Learn) -> Any:
    """learn(table, timeouts, cookie, eth_type=IPv4, ip_proto, the 5-tuple, load eth_dst, reg0[0]=1)."""
    l4 = "tcp" if action.proto == 6 else "udp"
    specs = [
        parser.NXFlowSpecMatch(src=0x0800, dst=("eth_type_nxm", 0), n_bits=16),
        parser.NXFlowSpecMatch(src=action.proto, dst=("ip_proto_nxm", 0), n_bits=8),
        parser.NXFlowSpecMatch(src=("ipv4_src_nxm", 0), dst=("ipv4_src_nxm", 0), n_bits=32),
        parser.NXFlowSpecMatch(src=("ipv4_dst_nxm", 0), dst=("ipv4_dst_nxm", 0), n_bits=32),
        parser.NXFlowSpecMatch(src=(f"{l4}_src_nxm", 0), dst=(f"{l4}_src_nxm", 0), n_bits=16),
        parser.NXFlowSpecMatch(src=(f"{l4}_dst_nxm", 0), dst=(f"{l4}_dst_nxm", 0), n_bits=16),
        parser.NXFlowSpecLoad(src=("eth_dst_nxm", 0), dst=("eth_dst_nxm", 0), n_bits=48),
        parser.NXFlowSpecLoad(src=1, dst=("reg0", 0), n_bits=1),
    ]
    return parser.NXActionLearn(
        table_id=action.table.number, specs=specs, idle_timeout=action.idle_timeout, priority=action.priority,
        cookie=action.cookie, fin_idle_timeout=action.fin_idle_timeout,
    )


def flow_mod_add(flow: Flow) -> Any:
    """The os-ken OFPFlowMod that adds ``flow``."""
    instructions: list[Any] = []
    meters = [a.meter for a in flow.actions if isinstance(a, ToController) and a.meter is not None]
    if meters:
        instructions.append(parser.OFPInstructionMeter(meters[0].meter_id))
    if flow.actions:
        instructions.append(
            parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, [_action(a) for a in flow.actions])
        )
    if flow.goto is not None:
        instructions.append(parser.OFPInstructionGotoTable(flow.goto.number))
    return parser.OFPFlowMod(
        DP,
        cookie=flow.cookie,
        table_id=flow.table.number,
        command=ofp.OFPFC_ADD,
        priority=flow.priority,
        match=parser.OFPMatch(**dict(flow.match)),
        instructions=instructions,
    )


def flow_mod_delete(cookie: int) -> Any:
    """The os-ken OFPFlowMod that deletes exactly the flows carrying ``cookie``, in any table."""
    return parser.OFPFlowMod(
        DP,
        cookie=cookie,
        cookie_mask=ALL_COOKIE_BITS,
        table_id=ofp.OFPTT_ALL,
        command=ofp.OFPFC_DELETE,
        out_port=ofp.OFPP_ANY,
        out_group=ofp.OFPG_ANY,
        match=parser.OFPMatch(),
    )


def serialize(msg: Any, xid: int = 0) -> bytes:
    """Serialize an os-ken message with a fixed xid."""
    msg.set_xid(xid)
    msg.serialize()
    return bytes(msg.buf)


def bundle_add(inner: Any) -> bytes:
    """Wrap an os-ken message in an ONF bundle-add (OpenFlow 1.3 bundles are the ONF extension)."""
    return serialize(parser.ONFBundleAddMsg(DP, BUNDLE_ID, BUNDLE_FLAGS, inner, []))


def bundle_ctrl(type_: int, xid: int) -> bytes:
    """A bundle open/commit/discard request."""
    return serialize(parser.ONFBundleCtrlMsg(DP, BUNDLE_ID, type_, BUNDLE_FLAGS, []), xid)


def encode_add(flow: Flow) -> bytes:
    """The bundle-add message installing ``flow``, encoded by os-ken (the reference encoding)."""
    return bundle_add(flow_mod_add(flow))


class EncodingCache:
    """Bundle-add bytes per cookie, shared by every switch connection.

    A flow's cookie names its content, so an entry never goes stale; entries for
    cookies no switch wants any more are dropped by :meth:`retain`. Deletes are
    rare and cheap to build, so they are not kept.
    """

    def __init__(self, templated: bool = True) -> None:
        self._adds: dict[int, bytes] = {}
        self.encode: Callable[[Flow], bytes] = encode_add
        if templated:
            self.encode = TemplateEncoder(encode_add)

    def add(self, flow: Flow) -> bytes:
        data = self._adds.get(flow.cookie)
        if data is None:
            data = self._adds[flow.cookie] = self.encode(flow)
        return data

    @staticmethod
    def delete(cookie: int) -> bytes:
        return bundle_add(flow_mod_delete(cookie))

    def forget(self, cookies: set[int]) -> None:
        """Drop the encodings of flows just deleted (another switch needing one re-encodes it)."""
        for cookie in cookies:
            self._adds.pop(cookie, None)

    def retain(self, cookies: set[int]) -> None:
        """Forget the encodings of flows that are no longer wanted anywhere."""
        for cookie in [c for c in self._adds if c not in cookies]:
            del self._adds[cookie]

    def __len__(self) -> int:
        return len(self._adds)
