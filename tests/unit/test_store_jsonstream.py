"""The JSON-RPC stream parser: same values as json.loads, however the stream is cut into pieces."""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import pytest

from portmesh.store.jsonstream import StreamParser, install

_TRICKY = ['"', "\\", "{", "}", "[", "]", "\\u00e9", "é", "😀", "\n", " ", "a", "\\\\", '\\"', "/"]


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(7 if depth < 4 else 4)
    if kind == 0:
        return "".join(rng.choice(_TRICKY) for _ in range(rng.randrange(6)))
    if kind == 1:
        return rng.choice([0, -1, 2**62, 1.5, 1e-7])
    if kind == 2:
        return rng.choice([True, False, None])
    if kind == 3:
        return ["uuid", "0c1e3e4a-9e1b-4f57-8a55-32c0b6f1a3f2"]
    if kind in (4, 5):
        return {f"k{i}{rng.choice(_TRICKY)}": _value(rng, depth + 1) for i in range(rng.randrange(4))}
    return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def _messages(rng: random.Random) -> list[Any]:
    return [{"id": i, "method": "update3", "params": [_value(rng), [_value(rng)]]} for i in range(rng.randrange(1, 5))]


def _parse_stream(text: str, cuts: list[int]) -> list[Any]:
    """Feed ``text`` the way ovs.jsonrpc.Connection.recv does: pieces, leftover input to the next parser."""
    out: list[Any] = []
    parser: StreamParser | None = None
    bounds = [0, *sorted(cuts), len(text)]
    for a, b in itertools.pairwise(bounds):
        pending = text[a:b]
        while pending:
            parser = parser or StreamParser()
            pending = pending[parser.feed(pending):]
            if parser.is_done():
                out.append(parser.finish())
                parser = None
    return out


@pytest.mark.parametrize("seed", range(300))
def test_any_cut_gives_what_json_loads_gives(seed: int) -> None:
    rng = random.Random(seed)
    messages = _messages(rng)
    sep = rng.choice(["", " ", "\n"])
    text = sep.join(json.dumps(m, ensure_ascii=rng.random() < 0.5) for m in messages)
    cuts = [rng.randrange(len(text) + 1) for _ in range(rng.randrange(0, 40))]
    assert _parse_stream(text, cuts) == messages


def test_every_single_cut_of_an_escape_heavy_message() -> None:
    message = {"a": ['x\\"}{', "\\\\", '"]', "\\u0041\\"], "b": {"\\": "{[\""}}
    text = json.dumps(message)
    for cut in range(len(text) + 1):
        assert _parse_stream(text, [cut]) == [message]
    assert _parse_stream(text, list(range(len(text)))) == [message]


def test_errors_are_reported_as_strings_like_the_library_parser() -> None:
    p = StreamParser()
    p.feed('{"a": tru}')
    assert p.is_done() and isinstance(p.finish(), str)
    p = StreamParser()
    assert p.feed("  42") == 3
    assert p.is_done() and isinstance(p.finish(), str)
    assert isinstance(StreamParser().finish(), str)


def test_install_routes_only_stream_parsers() -> None:
    import ovs.json

    install()
    install()
    if ovs.json.PARSER == ovs.json.PARSER_PY:
        assert isinstance(ovs.json.Parser(), StreamParser)
    assert ovs.json.from_string("[1, {\"a\": null}]") == [1, {"a": None}]  # check_trailer: the library's parser
