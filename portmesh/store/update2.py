"""Rows from ``monitor_cond_since`` updates (OVSDB's ``table-updates2``), kept whole so a diff can be applied.

Why this exists: a reader that resumes with ``monitor_cond_since`` gets only what
changed since its last transaction id, and that arrives in the ``update2``
format (ovsdb-server(7), "monitor_cond"): ``initial``/``insert`` carry a row
without its default-valued columns, and ``modify`` carries a *diff* — a scalar's
new value, a set's elements to toggle, a map's pairs to add, remove or change —
except that a set or map of at most one element that is not empty gets its new
value whole (ovsdb-server's ``ovsdb_datum_diff``; the OVS IDL's ``Datum.diff``).
A diff only means something against the row as it was, so :class:`RowCache`
keeps each monitored row in the plain ``monitor`` JSON form (every column
present) that :class:`portmesh.store.reader.JsonColumns` reads. Pure functions
of JSON, no I/O: unit-tested on their own.
"""

from __future__ import annotations

import sys
from typing import Any

ATOM, SET, MAP = "atom", "set", "map"
ZERO_UUID = "00000000-0000-0000-0000-000000000000"
_ATOM_DEFAULTS: dict[str, Any] = {
    "integer": 0,
    "real": 0.0,
    "boolean": False,
    "string": "",
    "uuid": ["uuid", ZERO_UUID],
}


def default_value(type_: Any, kind: str) -> Any:
    """A column's default in JSON (RFC 7047 §5.1): what update2 leaves out of an inserted row."""
    if kind == SET:
        return ["set", []]
    if kind == MAP:
        return ["map", []]
    key = type_ if isinstance(type_, str) else type_["key"]
    base = key if isinstance(key, str) else key["type"]
    if isinstance(key, dict) and "enum" in key:  # an enum's default is its first value in sort order
        values = key["enum"]
        choices = values[1] if isinstance(values, list) and values and values[0] == "set" else [values]
        return sorted(choices)[0]
    return _ATOM_DEFAULTS[base]


def _hashable(atom: Any) -> Any:
    return tuple(atom) if isinstance(atom, list) else atom


def _elements(value: Any) -> list[Any]:
    """A set's atoms: ``["set", [...]]``, or one atom sent bare (``["uuid", x]`` is an atom, not a set)."""
    if isinstance(value, list) and len(value) == 2 and value[0] == "set":
        return list(value[1])
    return [value]


def apply_diff(old: Any, diff: Any, kind: str, single: bool = False) -> Any:
    """The column's new JSON value from its old value and an update2 diff (``single``: max 1 element)."""
    if kind == ATOM:
        return diff
    if single and (_elements(old) if kind == SET else old[1]):
        return diff
    if kind == SET:
        out = {_hashable(a): a for a in _elements(old)}
        for atom in _elements(diff):
            key = _hashable(atom)
            if key in out:
                del out[key]
            else:
                out[key] = atom
        return ["set", list(out.values())]
    pairs = {_hashable(k): (k, v) for k, v in old[1]}
    for k, v in diff[1]:
        key = _hashable(k)
        if key not in pairs:
            pairs[key] = (k, v)
        elif _hashable(pairs[key][1]) == _hashable(v):
            del pairs[key]
        else:
            pairs[key] = (k, v)
    return ["map", [list(p) for p in pairs.values()]]


class RowCache:
    """Every monitored row as JSON, by table and UUID; turns update2 row changes into whole rows.

    ``kinds`` says how each column reads (atom/set/map), ``defaults`` each column's default value,
    ``single`` which set or map columns hold at most one element (their diff is the new value).

    A row is kept as a tuple in column order with its string atoms interned (the same public IP,
    protocol and container name recur across thousands of mappings): measured at 100,000 mappings,
    dicts of fresh strings cost ~48 MB on top of the reader's ~100 MB; this form a fraction of it.
    """

    def __init__(
        self,
        kinds: dict[str, dict[str, str]],
        defaults: dict[str, dict[str, Any]],
        single: dict[str, set[str]] | None = None,
    ) -> None:
        self._kinds = kinds
        self._columns = {table: tuple(columns) for table, columns in kinds.items()}
        self._defaults = {table: tuple(defaults[table][c] for c in cols) for table, cols in self._columns.items()}
        self._single = single or {}
        self.rows: dict[str, dict[str, tuple[Any, ...]]] = {table: {} for table in kinds}

    def clear(self) -> None:
        """Forget every row (before a full load)."""
        for rows in self.rows.values():
            rows.clear()

    def count(self) -> int:
        """How many rows are cached, all tables together."""
        return sum(len(rows) for rows in self.rows.values())

    def default(self, table: str, column: str) -> Any:
        """A column's default JSON value (what an inserted row without it holds)."""
        return self._defaults[table][self._columns[table].index(column)]

    def index(self, table: str) -> dict[str, int]:
        """Where each column is in this table's row tuples."""
        return {c: i for i, c in enumerate(self._columns[table])}

    def change(self, table: str, row_uuid: str, update: dict[str, Any]) -> tuple[Any, ...] | None:
        """Apply one ``row-update2``; return the whole row now (JSON values in column order, see
        :meth:`index`), or None if it was deleted."""
        rows = self.rows[table]
        if "delete" in update:
            rows.pop(row_uuid, None)
            return None
        columns = self._columns[table]
        if "modify" in update:
            row = dict(zip(columns, rows.get(row_uuid) or self._defaults[table], strict=True))
            kinds, single = self._kinds[table], self._single.get(table, set())
            for column, diff in update["modify"].items():
                if column in kinds:
                    row[column] = apply_diff(row[column], diff, kinds[column], column in single)
            whole = tuple(_intern(row[c]) for c in columns)
        else:
            new = update.get("initial", update.get("insert")) or {}
            whole = tuple(
                _intern(new[c]) if c in new else d for c, d in zip(columns, self._defaults[table], strict=True)
            )
        rows[row_uuid] = whole
        return whole


def _intern(value: Any) -> Any:
    return sys.intern(value) if type(value) is str else value
