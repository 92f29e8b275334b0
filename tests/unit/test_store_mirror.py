"""The store's mirror without a server: row notices in any order give the state the rows describe."""

from __future__ import annotations

import itertools
import uuid
from ipaddress import IPv4Address
from typing import Any

from portmesh.model.entities import Mapping, MappingKey, Proto
from portmesh.store.mirror import ROW_CREATE, ROW_DELETE, ROW_UPDATE, Mirror


class _Datum:
    def __init__(self, value: Any) -> None:
        self.value = value

    def to_python(self, _uuid_to_row: Any) -> Any:
        return self.value


class _Row:
    """What the mirror reads of an IDL row: its UUID and committed data (column -> datum)."""

    def __init__(self, **columns: Any) -> None:
        self.uuid = uuid.uuid4()
        self._data = {name: _Datum(value) for name, value in columns.items()}


def _mapping_row(port: int, container: str) -> _Row:
    return _Row(public_ip="203.0.113.1", proto="tcp", port=port, container=container)


def _key(port: int) -> MappingKey:
    return MappingKey(IPv4Address("203.0.113.1"), Proto.TCP, port)


def test_a_key_deleted_and_inserted_in_one_batch_survives_either_order() -> None:
    old, new = _mapping_row(80, "a"), _mapping_row(80, "b")
    for notices in itertools.permutations([(ROW_DELETE, old), (ROW_CREATE, new)]):
        mirror = Mirror()
        mirror.apply(ROW_CREATE, "Mapping", old)
        for event, row in notices:
            mirror.apply(event, "Mapping", row)
        assert mirror.mappings == {_key(80): Mapping(_key(80), "b")}
        assert mirror.mapping_rows == {_key(80): new.uuid}
        assert mirror.mappings_of == {"b": {_key(80)}}


def test_an_update_moves_a_mapping_and_a_delete_forgets_it() -> None:
    mirror = Mirror()
    row = _mapping_row(80, "a")
    mirror.apply(ROW_CREATE, "Mapping", row)
    row._data["container"] = _Datum("b")
    mirror.apply(ROW_UPDATE, "Mapping", row)
    assert mirror.mappings_of == {"b": {_key(80)}}
    mirror.apply(ROW_DELETE, "Mapping", row)
    assert (mirror.mappings, mirror.mapping_rows, mirror.mappings_of) == ({}, {}, {})


def test_status_columns_leave_the_desired_host_alone_and_global_gives_the_generation() -> None:
    mirror = Mirror()
    host = _Row(name="h1", datapath_id=1, underlay_ip=[], switch_generation=0)
    mirror.apply(ROW_CREATE, "Host", host)
    before = mirror.state()
    host._data["switch_generation"] = _Datum(5)
    mirror.apply(ROW_UPDATE, "Host", host)
    mirror.apply(ROW_CREATE, "Global", _Row(generation=7))
    after = mirror.state()
    assert after.hosts == before.hosts and after.generation == 7
    after.hosts.clear()  # a snapshot is the caller's to change
    assert mirror.hosts
