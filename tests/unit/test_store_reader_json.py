"""StateReader's pure parts: OVSDB JSON values as the IDL would give them, and the leader check."""

from __future__ import annotations

import json

from portmesh.store import rows as R
from portmesh.store.reader import ATOM, MAP, SET, JsonColumns, StateReader, column_kinds, decode


def test_column_kinds_follow_the_schema() -> None:
    kinds = column_kinds(json.loads(R.schema_path().read_text()), R.DESIRED_COLUMNS)
    assert kinds["Mapping"] == {
        "public_ip": ATOM, "proto": ATOM, "port": ATOM, "container": ATOM,
        "backends": MAP, "allow": SET, "deny": SET, "health": MAP, "backend_health": MAP,  # schema 1.6.0
    }
    assert kinds["Container"]["ips"] == SET and kinds["Container"]["image"] == SET  # a set, and an optional
    assert kinds["Host"]["underlay_ip"] == SET and kinds["Global"]["generation"] == ATOM
    assert set(kinds) == set(R.DESIRED_COLUMNS)


def test_decode_like_the_idl() -> None:
    assert decode("203.0.113.1", ATOM) == "203.0.113.1"
    assert decode(["uuid", "5d2f"], ATOM) == "5d2f"
    assert decode(["set", []], SET) == []
    assert decode("busybox", SET) == ["busybox"]  # a one-element set travels as its element
    assert decode(["set", ["203.0.113.1", "203.0.113.2"]], SET) == ["203.0.113.1", "203.0.113.2"]
    assert decode(["map", [["a", 1], ["b", ["uuid", "x"]]]], MAP) == {"a": 1, "b": "x"}


def test_json_row_reads_as_the_row_converters_expect() -> None:
    kinds = column_kinds(json.loads(R.schema_path().read_text()), R.DESIRED_COLUMNS)
    row = {"public_ip": "203.0.113.10", "proto": "udp", "port": 53, "container": "dns1"}
    m = R.mapping_from_row(JsonColumns(row, kinds["Mapping"]))
    assert (str(m.public_ip), m.proto.value, m.port, m.container) == ("203.0.113.10", "udp", 53, "dns1")
    host = R.host_from_row(JsonColumns({"name": "h1", "datapath_id": 7, "underlay_ip": ["set", []]}, kinds["Host"]))
    assert (host.name, host.datapath_id, host.underlay_ip) == ("h1", 7, None)


def test_usable_only_on_a_standalone_server_or_the_connected_leader() -> None:
    def db(**row: object) -> dict[str, object]:
        return {"Database": {"u1": {"new": {"name": "Portmesh", **row}}}}

    assert StateReader._usable(db(model="standalone")) is True
    assert StateReader._usable(db(model="clustered", connected=True, leader=True)) is True
    assert StateReader._usable(db(model="clustered", connected=True, leader=False)) is False
    assert StateReader._usable(db(model="clustered", connected=False, leader=True)) is False
    other = {"Database": {"u2": {"new": {"name": "_Server", "model": "standalone"}}}}
    assert StateReader._usable(other) is None, "an update about another database says nothing"
