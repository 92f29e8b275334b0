"""A JSON-RPC stream parser for the OVS Python library that leaves the parsing to the C ``json`` module.

The ``ovs`` package from PyPI has no C JSON extension, so ``ovs.jsonrpc`` parses
every byte the server sends with ``ovs.json.Parser``, a character-by-character
lexer in Python: ~1 us per character. A transaction of 250 mappings brings back
~45,000 characters (the row updates and the reply), and that lexing was the
largest single cost of a write; the initial load of 100,000 mappings is ~12 MB.

:class:`StreamParser` only finds where a message ends — it jumps from one
structural character or string to the next with compiled regular expressions,
keeping depth and string state across the 4 KB chunks the stream is read in —
and hands the complete text to :func:`json.loads`. It implements what
``ovs.jsonrpc.Connection`` uses: ``feed(str) -> characters consumed``,
``is_done()``, ``finish() -> value, or an error string``.

:func:`install` makes ``ovs.json.Parser()`` (no arguments: how ``ovs.jsonrpc``
makes one per message) return a :class:`StreamParser` (by wrapping the class's
``__new__``, the hook the library itself uses to pick its C parser); every other use
(``check_trailer=True``: ``from_string``/``from_stream``) still gets the
library's own parser. If the library ever has its C parser, nothing is changed.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

# One of the four brackets, or the quote that opens a string.
_STRUCTURE = re.compile(r'[{}\[\]"]')
# The rest of a string after its opening quote, up to and including the closing quote.
_STRING_REST = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SPACE = " \t\r\n"


class StreamParser:
    """Parses one JSON object or array fed in pieces; see the module docstring."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._depth = 0
        self._in_string = False
        self._escaped = False  # the last piece ended inside a string, right after a backslash
        self._done = False
        self._error: str | None = None

    def feed(self, s: str) -> int:
        """Take characters from ``s`` up to the end of the value; return how many were taken."""
        if self._done:
            return 0
        start, pos, n = 0, 0, len(s)
        if self._depth == 0 and not self._parts:  # before the value: skip spaces, check how it starts
            while pos < n and s[pos] in _SPACE:
                pos += 1
            if pos == n:
                return n
            if s[pos] not in "{[":
                self._error = f"a JSON-RPC message must be an object or array, not {s[pos]!r}"
                self._done = True
                return pos + 1
            start = pos
        while True:
            if self._in_string:
                if self._escaped:  # the character after a backslash that ended the last piece
                    if pos >= n:
                        break
                    pos += 1
                    self._escaped = False
                m = _STRING_REST.match(s, pos)
                if m is None:  # the string goes on in the next piece
                    tail = s[pos:]
                    self._escaped = (len(tail) - len(tail.rstrip("\\"))) % 2 == 1
                    break
                pos = m.end()
                self._in_string = False
            m = _STRUCTURE.search(s, pos)
            if m is None:
                break
            pos = m.end()
            c = s[pos - 1]
            if c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    self._parts.append(s[start:pos])
                    self._done = True
                    return pos
        self._parts.append(s[start:])
        return n

    def is_done(self) -> bool:
        """True once a whole value has been fed."""
        return self._done

    def finish(self) -> Any:
        """The parsed value, or (as ``ovs.json.Parser`` does) a string saying what is wrong."""
        if self._error is not None:
            return self._error
        if not self._done:
            return "unexpected end of input"
        try:
            return json.loads("".join(self._parts))
        except ValueError as exc:
            return str(exc)


_install_lock = threading.Lock()
_installed = False


def install() -> None:
    """Route the OVS library's stream parsing through :class:`StreamParser` (idempotent)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        import ovs.json

        if ovs.json.PARSER != ovs.json.PARSER_PY:
            _installed = True  # the library has its C parser; it is fast already
            return
        library = ovs.json.Parser
        library_new = library.__new__

        def new(cls: type, *args: Any, **kwargs: Any) -> Any:
            # Only the class's __new__ is wrapped (ovs.json's own code names the class, so the
            # class itself must stay); returning a StreamParser skips the library's __init__.
            if cls is library and not args and not kwargs:
                return StreamParser()
            return library_new(cls, *args, **kwargs)

        library.__new__ = staticmethod(new)
        _installed = True
