"""Issue 15's vocabulary: backends, weights, health checks and source policies of a mapping (pure)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from portmesh.model.entities import Backend, Container, DesiredState, HealthKind, Mapping, MappingKey, PortBlock, Proto
from portmesh.model.errors import Conflict, InvalidInput, NotFound
from portmesh.model.validation import new_mapping, parse_health, parse_networks, with_backend, without_backend

IP = IPv4Address("203.0.113.10")
KEY = MappingKey(IP, Proto.TCP, 80)


def state() -> DesiredState:
    def c(name: str, start: int, ips: tuple[IPv4Address, ...] = (IP,)) -> Container:
        return Container(name=name, host="h1", mac="02:00:00:00:00:01", ips=ips, block=PortBlock(start, 1024))

    containers = {"a": c("a", 32768), "b": c("b", 33792), "c": c("c", 34816), "x": c("x", 32768, (IPv4Address("203.0.113.11"),))}
    return DesiredState(containers=containers)


def test_a_plain_mapping_has_its_container_as_its_one_backend() -> None:
    m = Mapping(KEY, "a")
    assert m.backends == (Backend("a", 1),) and not m.balanced and m.names == ("a",)
    assert m == Mapping(KEY, "a", backends=(Backend("a"),))
    with pytest.raises(ValueError, match="first backend"):
        Mapping(KEY, "a", backends=(Backend("b"),))


def test_serving_leaves_out_down_backends_and_never_fails_open() -> None:
    m = Mapping(KEY, "a", backends=(Backend("a"), Backend("b", 2)), down=frozenset({"a"}))
    assert m.serving() == (Backend("b", 2),)
    assert Mapping(KEY, "a", down=frozenset({"a"})).serving() == ()


def test_deny_wins_and_an_allow_list_closes_everything_else() -> None:
    m = Mapping(KEY, "a", allow=(IPv4Network("198.51.100.0/25"),), deny=(IPv4Network("198.51.100.7/32"),))
    assert m.filtered
    assert not m.permits(IPv4Address("198.51.100.7"))
    assert m.permits(IPv4Address("198.51.100.8"))
    assert not m.permits(IPv4Address("198.51.100.200"))
    assert Mapping(KEY, "a").permits(IPv4Address("192.0.2.1"))  # open by default


def test_new_mapping_with_several_weighted_backends() -> None:
    m = new_mapping(state(), KEY, ["a", "b", "c"], weights={"c": 2})
    assert m.container == "a" and m.backends == (Backend("a"), Backend("b"), Backend("c", 2))


@pytest.mark.parametrize(
    ("names", "weights", "error", "field"),
    [
        (["a", "a"], {}, InvalidInput, "backends[1]"),
        (["a", "nope"], {}, NotFound, "backends[1]"),
        (["a", "x"], {}, Conflict, "backends[1]"),  # x does not hold the IP
        (["a", "b"], {"c": 2}, InvalidInput, "weights.c"),
        (["a", "b"], {"b": 0}, InvalidInput, "weights.b"),
        ([], {}, InvalidInput, "backends"),
    ],
)
def test_new_mapping_refusals_name_the_field(
    names: list[str], weights: dict[str, int], error: type[Exception], field: str
) -> None:
    with pytest.raises(error) as info:
        new_mapping(state(), KEY, names, weights=weights)
    assert getattr(info.value, "field", None) == field


def test_a_port_in_any_backends_block_is_refused() -> None:
    with pytest.raises(Conflict, match="ephemeral block"):
        new_mapping(state(), MappingKey(IP, Proto.TCP, 33800), ["a", "b"])


def test_backends_are_added_and_removed_one_at_a_time() -> None:
    st = state()
    m = with_backend(st, new_mapping(st, KEY, "a"), "b", 3)
    assert m.backends == (Backend("a"), Backend("b", 3))
    with pytest.raises(Conflict):
        with_backend(st, m, "b")
    m2 = without_backend(m, "a")
    assert m2.container == "b" and m2.backends == (Backend("b", 3),)
    with pytest.raises(Conflict, match="last backend"):
        without_backend(m2, "b")
    with pytest.raises(NotFound):
        without_backend(m2, "a")


def test_parse_networks_refuses_host_bits_and_names_the_entry() -> None:
    assert parse_networks(["198.51.100.7", "198.51.100.0/25", "198.51.100.7/32"], "allow") == (
        IPv4Network("198.51.100.0/25"), IPv4Network("198.51.100.7/32"))
    for bad in ("198.51.100.1/25", "198.51.100.0/33", "example.org", "1.2.3"):
        with pytest.raises(InvalidInput) as info:
            parse_networks(["198.51.100.0/24", bad], "deny")
        assert info.value.field == "deny[1]"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "icmp"}, "health.kind"),
        ({"kind": "tcp", "port": 70000}, "health.port"),
        ({"kind": "http", "path": "no-slash"}, "health.path"),
        ({"kind": "http", "path": "/a b"}, "health.path"),
        ({"kind": "http", "expect": 99}, "health.expect"),
        ({"kind": "tcp", "interval": 0.0}, "health.interval"),
        ({"kind": "tcp", "interval": 1.0, "timeout": 2.0}, "health.timeout"),
        ({"kind": "tcp", "threshold": 0}, "health.threshold"),
    ],
)
def test_parse_health_refusals(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_health(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_parse_health_defaults() -> None:
    h = parse_health("http", path="/healthz", expect=204, interval=1, timeout=0.5, threshold=3)
    got = (h.kind, h.port, h.path, h.expect, h.interval, h.timeout, h.threshold)
    assert got == (HealthKind.HTTP, 0, "/healthz", 204, 1.0, 0.5, 3)
