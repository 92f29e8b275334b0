"""The desired state, kept current row by row as the IDL applies the server's updates.

Rebuilding :class:`DesiredState` from the IDL cache on every change cost
~60 us per mapping (each column read goes through the IDL's ``Row.__getattr__``
and ``Datum.to_python``): ~6 s at 100,000 mappings, after every change, status
reports included. Instead the IDL thread hands every row notice (create, update,
delete) to :class:`Mirror`, which converts just that row and updates its
dictionaries; a snapshot is then three dictionary copies.

The mirror also replaces the IDL's own indexes (``index_create``): those are
sorted lists compared through ``Row.__getattr__``, re-sorted on every column
assignment inside a transaction, which made an insert of 250 mappings spend
most of its build time keeping them up to date. Here a lookup by name or by
mapping key is one dictionary access, and a row is found again by its UUID.

Only *committed* data is read (``Row._data``), never a transaction's pending
changes, so notices that arrive while a commit is in flight cannot leak
uncommitted values into a snapshot. Everything here runs under the
connection lock (in the IDL thread, or a reader holding it).
"""

from __future__ import annotations

import uuid as uuid_mod
from collections.abc import Iterable
from typing import Any

from portmesh.model.config import NetworkConfig
from portmesh.model.entities import Container, DesiredState, Host, Mapping, MappingKey
from portmesh.store import rows as R

# ovs.db.idl's notice events (strings; importing ovs.db.idl here would pull in eventlet's banner).
ROW_CREATE, ROW_UPDATE, ROW_DELETE = "create", "update", "delete"

# A row's identity: the IDL's uuid.UUID, or its text from a raw monitor (portmesh.store.reader).
UUID = uuid_mod.UUID | str


def _no_references(value: Any, _base: Any) -> Any:
    """Datum.to_python's UUID→row translation; the Portmesh schema has no reference columns."""
    return value


class Committed:
    """A row's committed columns as attributes, as :mod:`portmesh.store.rows` reads them.

    ``Row.__getattr__`` would overlay the active transaction's pending writes;
    this reads ``Row._data`` (what the server confirmed) and converts it the same way.
    """

    __slots__ = ("_data",)

    def __init__(self, row: R.Row) -> None:
        self._data = row._data

    def empty(self, columns: tuple[str, ...]) -> bool:
        """True if each of these columns is empty or not replicated, without converting a Datum.

        ``dict.get``: the IDL's ``ColumnDefaultDict`` makes up a default Datum for every column it
        does not hold (a column at its default): asking it cost more than the conversion saved."""
        data = self._data
        for column in columns:
            datum = dict.get(data, column)
            if datum is not None and datum.values:
                return False
        return True

    def __getattr__(self, column: str) -> Any:
        try:
            datum = self._data[column]
        except KeyError:
            raise AttributeError(column) from None
        return datum.to_python(_no_references)


class Mirror:
    """Desired state by name and key, plus where each entity's row is (its UUID)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything (before the whole database is loaded again)."""
        self.generation = 0
        # None until the Global row is seen: the snapshot then keeps DesiredState's own default.
        self.config: NetworkConfig | None = None
        self.hosts: dict[str, Host] = {}
        self.containers: dict[str, Container] = {}
        self.mappings: dict[MappingKey, Mapping] = {}
        # name/key -> row UUID, for writes (table.rows[uuid]) and uniqueness checks
        self.host_rows: dict[str, UUID] = {}
        self.container_rows: dict[str, UUID] = {}
        self.mapping_rows: dict[MappingKey, UUID] = {}
        # container name -> keys of the mappings it is a backend of (remove_container)
        self.mappings_of: dict[str, set[MappingKey]] = {}
        # Block table: (public IP, block start) -> container claiming it, and each container's claim rows
        self.claims: dict[tuple[str, int], str] = {}
        self.claim_rows_of: dict[str, set[UUID]] = {}
        self._claim_of: dict[UUID, tuple[tuple[str, int], str]] = {}
        # row UUID -> name/key, because a deleted row is known by its UUID
        self._host_of: dict[UUID, str] = {}
        self._container_of: dict[UUID, str] = {}
        self._mapping_of: dict[UUID, Mapping] = {}
        self._global: UUID | None = None

    # -- applying the server's changes ------------------------------------------------------------

    def apply(self, event: str, table: str, row: R.Row) -> None:
        """One row notice from the IDL (``row`` as it is now; for a delete, as it was)."""
        self.apply_columns(table, row.uuid, None if event == ROW_DELETE else Committed(row))

    def apply_columns(self, table: str, row_uuid: UUID, columns: R.Row | None) -> None:
        """One row change, from any source: ``columns`` reads the row as it is now, as attributes
        (the IDL's committed data, or a raw monitor update); None if the row was deleted."""
        if table == "Mapping":
            self._drop_mapping(row_uuid)
            if columns is not None:
                self._put_mapping(row_uuid, columns)
        elif table == "Container":
            self._drop_container(row_uuid)
            if columns is not None:
                self._put_container(row_uuid, columns)
        elif table == "Block":
            self._drop_claim(row_uuid)
            if columns is not None:
                self._put_claim(row_uuid, columns)
        elif table == "Host":
            self._drop_host(row_uuid)
            if columns is not None:
                self._put_host(row_uuid, columns)
        elif table == "Global":
            if columns is None:
                if row_uuid == self._global:
                    self._global, self.generation, self.config = None, 0, None
            else:
                self._global = row_uuid
                self.generation = int(columns.generation)
                self.config = R.config_from_row(columns) if hasattr(columns, "public_pools") else None

    def rebuild(self, tables: dict[str, Iterable[R.Row]]) -> None:
        """Start over from the committed rows of every table (after the IDL reloaded its cache)."""
        self.reset()
        for name, table_rows in tables.items():
            for row in table_rows:
                if row._data is not None:  # a row a transaction inserted but has not committed
                    self.apply(ROW_CREATE, name, row)

    def state(self) -> DesiredState:
        """A copy the caller may keep and change: the entities are immutable, the dicts are new."""
        hosts, containers, mappings = dict(self.hosts), dict(self.containers), dict(self.mappings)
        if self.config is None:
            return DesiredState(self.generation, hosts, containers, mappings)
        return DesiredState(self.generation, hosts, containers, mappings, self.config)

    # -- per table ---------------------------------------------------------------------------------

    def _put_host(self, row_uuid: UUID, columns: R.Row) -> None:
        host = R.host_from_row(columns)
        self.hosts[host.name] = host
        self.host_rows[host.name] = row_uuid
        self._host_of[row_uuid] = host.name

    def _drop_host(self, row_uuid: UUID) -> None:
        name = self._host_of.pop(row_uuid, None)
        if name is not None and self.host_rows.get(name) == row_uuid:
            del self.hosts[name], self.host_rows[name]

    def _put_container(self, row_uuid: UUID, columns: R.Row) -> None:
        c = R.container_from_row(columns)
        self.containers[c.name] = c
        self.container_rows[c.name] = row_uuid
        self._container_of[row_uuid] = c.name

    def _drop_container(self, row_uuid: UUID) -> None:
        name = self._container_of.pop(row_uuid, None)
        if name is not None and self.container_rows.get(name) == row_uuid:
            del self.containers[name], self.container_rows[name]

    def _put_claim(self, row_uuid: UUID, columns: R.Row) -> None:
        claim, container = (str(columns.public_ip), int(columns.block_start)), str(columns.container)
        self.claims[claim] = container
        self.claim_rows_of.setdefault(container, set()).add(row_uuid)
        self._claim_of[row_uuid] = (claim, container)

    def _drop_claim(self, row_uuid: UUID) -> None:
        found = self._claim_of.pop(row_uuid, None)
        if found is None:
            return
        claim, container = found
        if self.claims.get(claim) == container:
            del self.claims[claim]
        rows = self.claim_rows_of.get(container)
        if rows is not None:
            rows.discard(row_uuid)
            if not rows:
                del self.claim_rows_of[container]

    def put_mapping(self, row_uuid: UUID, m: Mapping) -> None:
        """A Mapping row changed (or appeared) and reads as ``m``: the reader's fast path for plain
        mappings, which it builds without going through :func:`portmesh.store.rows.mapping_from_row`."""
        self._drop_mapping(row_uuid)
        self._put_decoded(row_uuid, m)

    def _put_mapping(self, row_uuid: UUID, columns: R.Row) -> None:
        if type(columns) is Committed and columns.empty(R.MAPPING_POLICY):  # the IDL's plain rows: fast path
            m = R.plain_mapping(columns.public_ip, columns.proto, columns.port, columns.container)
        else:
            m = R.mapping_from_row(columns)
        self._put_decoded(row_uuid, m)

    def _put_decoded(self, row_uuid: UUID, m: Mapping) -> None:
        self.mappings[m.key] = m
        self.mapping_rows[m.key] = row_uuid
        self._mapping_of[row_uuid] = m
        for name in m.names if m.balanced else (m.container,):
            self.mappings_of.setdefault(name, set()).add(m.key)

    def _drop_mapping(self, row_uuid: UUID) -> None:
        m = self._mapping_of.pop(row_uuid, None)
        if m is None:
            return
        # One transaction may delete a row and insert another with the same key; the
        # notices come in any order, so only drop what still belongs to this row.
        current: Mapping | None
        if self.mapping_rows.get(m.key) == row_uuid:
            del self.mappings[m.key], self.mapping_rows[m.key]
            current = None
        else:
            current = self.mappings.get(m.key)
        for name in m.names if m.balanced else (m.container,):
            if current is not None and name in current.names:
                continue
            keys = self.mappings_of.get(name)
            if keys is not None:
                keys.discard(m.key)
                if not keys:
                    del self.mappings_of[name]
