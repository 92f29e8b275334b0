"""OVSDB JSON values of monitored columns, read as the IDL's ``to_python`` gives them (RFC 7047 §5.1).

Split from :mod:`portmesh.store.reader`, which feeds monitor updates through these to the
:class:`portmesh.store.mirror.Mirror`: a row of a plain ``monitor`` update (:class:`JsonColumns`)
or of the update2 row cache (:class:`TupleColumns`) reads as attributes the way
:mod:`portmesh.store.rows` expects.
"""

from __future__ import annotations

from typing import Any

ATOM, SET, MAP = "atom", "set", "map"


def column_kinds(schema: dict[str, Any], columns: dict[str, tuple[str, ...]]) -> dict[str, dict[str, str]]:
    """For each monitored column, how its JSON reads: a bare atom, a set (a list here) or a map."""
    kinds: dict[str, dict[str, str]] = {}
    for table, names in columns.items():
        declared = schema["tables"][table]["columns"]
        kinds[table] = {}
        for name in names:
            type_ = declared[name]["type"]
            if isinstance(type_, str):
                kinds[table][name] = ATOM
            elif "value" in type_:
                kinds[table][name] = MAP
            else:
                single = type_.get("min", 1) == 1 and type_.get("max", 1) == 1
                kinds[table][name] = ATOM if single else SET
    return kinds


def _atom(value: Any) -> Any:
    if isinstance(value, list) and len(value) == 2 and value[0] in ("uuid", "named-uuid"):
        return value[1]
    return value


def decode(value: Any, kind: str) -> Any:
    """An OVSDB JSON value (RFC 7047 §5.1) as the IDL's ``to_python`` gives it: atom, list or dict."""
    if kind == ATOM:
        return _atom(value)
    if kind == SET:
        if isinstance(value, list) and len(value) == 2 and value[0] == "set":
            return [_atom(v) for v in value[1]]
        return [_atom(value)]  # a one-element set is sent as its element
    return {_atom(k): _atom(v) for k, v in value[1]}


class JsonColumns:
    """A row of a monitor update, read as attributes the way :mod:`portmesh.store.rows` expects."""

    __slots__ = ("_kinds", "_row")

    def __init__(self, row: dict[str, Any], kinds: dict[str, str]) -> None:
        self._row = row
        self._kinds = kinds

    def __getattr__(self, column: str) -> Any:
        try:
            return decode(self._row[column], self._kinds[column])
        except KeyError:
            raise AttributeError(column) from None


class TupleColumns:
    """A row of :class:`portmesh.store.update2.RowCache` (a tuple in column order), read as attributes."""

    __slots__ = ("_index", "_kinds", "_row")

    def __init__(self, row: tuple[Any, ...], kinds: dict[str, str], index: dict[str, int]) -> None:
        self._row = row
        self._kinds = kinds
        self._index = index

    def __getattr__(self, column: str) -> Any:
        try:
            return decode(self._row[self._index[column]], self._kinds[column])
        except KeyError:
            raise AttributeError(column) from None
