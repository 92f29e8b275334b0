"""Row <-> model conversion and commit-error mapping of the store, without a server."""

from __future__ import annotations

import json
from ipaddress import IPv4Address
from types import SimpleNamespace

import pytest

from portmesh.model.entities import (
    Container,
    ContainerStatus,
    Host,
    Mapping,
    MappingKey,
    PortBlock,
    Proto,
    RunState,
    mac_for,
)
from portmesh.model.errors import Conflict, InvalidInput
from portmesh.store import rows as R


def _error(details: str) -> str:
    """What the IDL's Transaction.get_error() returns: the failed operation's JSON reply."""
    return json.dumps({"error": "constraint violation", "details": details})


@pytest.mark.parametrize(
    ("details", "field"),
    [
        ('Transaction causes multiple rows in "Host" table to have identical values (h) for index on column "name".',
         "name"),
        ('Transaction causes multiple rows in "Host" table to have identical values (1) for index on column '
         '"datapath_id".  First row, with UUID x, was inserted by this transaction.', "datapath_id"),
        ('Transaction causes multiple rows in "Container" table to have identical values ("02:00") for index on '
         'column "mac".', "mac"),
        ('Transaction causes multiple rows in "Mapping" table to have identical values ("1.2.3.4", tcp, and 80) for '
         'index on columns "public_ip", "proto", and "port".', "port"),
    ],
)
def test_index_violations_become_conflicts_naming_the_field(details: str, field: str) -> None:
    err = R.error_from_commit(_error(details))
    assert isinstance(err, Conflict)
    assert err.field == field


def test_other_errors_are_not_guessed() -> None:
    assert R.error_from_commit(_error("something else")) is None
    assert R.error_from_commit("not json at all") is None


def test_max_rows_violation_is_recognised_per_table() -> None:
    text = _error('transaction causes "Global" table to contain 2 rows, greater than the schema-defined limit of 1')
    assert R.is_max_rows_violation(text, "Global")
    assert not R.is_max_rows_violation(text, "Host")


def test_rows_round_trip_through_the_column_layout() -> None:
    host = Host("h1", 7, IPv4Address("198.18.0.10"))
    row = SimpleNamespace()
    R.fill_host_row(row, host)
    assert R.host_from_row(row) == host
    c = Container("c", "h1", mac_for("c"), (IPv4Address("203.0.113.1"), IPv4Address("203.0.113.9")),
                  PortBlock(32768, 1024), ("sh", "-c", "echo 'a b'"), "busybox")
    row = SimpleNamespace()
    R.fill_container_row(row, c)
    row.state, row.netns, row.pid, row.message = [], "", [], ""
    assert json.loads(row.command) == ["sh", "-c", "echo 'a b'"]
    assert R.container_from_row(row) == c
    assert R.container_status_from_row(row) is None
    status = ContainerStatus(RunState.ERROR, "pmc-c", None, "image not found")
    R.fill_container_status(row, status)
    assert R.container_status_from_row(row) == status
    m = Mapping(MappingKey(IPv4Address("203.0.113.1"), Proto.UDP, 53), "c")
    row = SimpleNamespace()
    R.fill_mapping_row(row, m)
    assert R.mapping_from_row(row) == m


def test_datapath_ids_beyond_a_signed_64_bit_integer_are_refused() -> None:
    with pytest.raises(InvalidInput) as err:
        R.check_host(Host("h", 2**63))
    assert err.value.field == "datapath_id"


def test_schema_file_is_shipped() -> None:
    schema = json.loads(R.schema_path().read_text())
    assert schema["name"] == "Portmesh" and tuple(map(int, schema["version"].split("."))) >= (1, 2, 0)
    assert all(t["isRoot"] for t in schema["tables"].values())


def test_config_round_trips_through_the_global_row_columns() -> None:
    from dataclasses import replace
    from ipaddress import IPv4Network

    from portmesh.model.config import DEFAULT_CONFIG

    config = replace(DEFAULT_CONFIG, public_pools=(IPv4Network("203.0.113.0/25"), IPv4Network("198.51.100.0/24")),
                     block_size=256, vxlan_vni=9)
    row = SimpleNamespace(**R.config_columns(config))
    back = R.config_from_row(row)
    assert back == replace(config, public_pools=tuple(sorted(config.public_pools)))
    assert set(R.config_json(config)) == set(R.CONFIG_COLUMNS) == set(R.DESIRED_COLUMNS["Global"]) - {"generation"}
    empty = SimpleNamespace(**{**R.config_columns(config), "public_pools": []})
    assert R.config_from_row(empty).public_pools == ()  # no pools, not the default


def test_host_role_defaults_to_gateway_for_rows_without_one() -> None:
    from portmesh.model.entities import HostRole

    row = SimpleNamespace(name="h", datapath_id=1, underlay_ip=["198.19.0.11"], role=[])
    assert R.host_from_row(row).role is HostRole.GATEWAY
    row.role = ["compute"]
    assert R.host_from_row(row).role is HostRole.COMPUTE
    status = SimpleNamespace(switch_generation=1, agent_generation=2, switch_connected=True, switch_waiting=[],
                             tunnels={"h3": "down: x", "h2": "up"})
    assert R.host_status_from_row(status).tunnels == (("h2", "up"), ("h3", "down: x"))
