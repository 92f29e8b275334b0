"""Switch.read_ports: a port added while the port-description request is out is not lost."""

from __future__ import annotations

import asyncio
from typing import Any

from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser

from portmesh.controller.encoding import DP
from portmesh.controller.switch import Switch


def port(name: str, number: int) -> Any:
    return parser.OFPPort(number, b"\x00" * 6, name.encode(), 0, 0, 0, 0, 0, 0, 0, 0)


class RacingConnection:
    """Answers the port-description request with ``reply_ports``; before the caller resumes, the
    connection has already read and dispatched ``statuses`` (as its serve loop does with
    messages buffered right behind the reply)."""

    def __init__(self, reply_ports: list[Any], statuses: list[Any]) -> None:
        self.reply_ports, self.statuses = reply_ports, statuses
        self.switch: Switch | None = None

    async def request(self, _msg: Any) -> list[Any]:
        assert self.switch is not None
        for status in self.statuses:
            self.switch.port_status(status)
        return [parser.OFPPortDescStatsReply(DP, body=self.reply_ports)]


def read_with(reply_ports: list[Any], statuses: list[Any]) -> dict[str, int]:
    conn = RacingConnection(reply_ports, statuses)
    switch = Switch(conn, cache=None)  # type: ignore[arg-type]  # only ports are exercised
    conn.switch = switch
    return asyncio.run(switch.read_ports())


def test_a_port_added_as_the_reply_arrives_is_kept() -> None:
    added = parser.OFPPortStatus(DP, ofp.OFPPR_ADD, port("up0", 3))
    assert read_with([port("vx1", 1), port("c1", 2)], [added]) == {"vx1": 1, "c1": 2, "up0": 3}


def test_statuses_apply_in_order_on_top_of_the_reply() -> None:
    gone = parser.OFPPortStatus(DP, ofp.OFPPR_DELETE, port("c1", 2))
    back = parser.OFPPortStatus(DP, ofp.OFPPR_ADD, port("c1", 5))
    assert read_with([port("c1", 2)], [gone, back]) == {"c1": 5}
    assert read_with([port("c1", 2)], [back, gone]) == {}


def test_after_the_reply_statuses_are_applied_once_as_before() -> None:
    conn = RacingConnection([port("c1", 2)], [])
    switch = Switch(conn, cache=None)  # type: ignore[arg-type]
    conn.switch = switch
    asyncio.run(switch.read_ports())
    assert switch.port_status(parser.OFPPortStatus(DP, ofp.OFPPR_ADD, port("up0", 3)))
    assert switch.ports == {"c1": 2, "up0": 3}
