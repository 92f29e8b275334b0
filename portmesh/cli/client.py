"""HTTP client for the portmesh API: the CLI's only way to reach the system.

The CLI never imports the API or the store: it speaks HTTP, so it works the same
against a local API, a remote one, or a test server. Refusals come back as
:class:`ApiError` carrying the field and reason the API named.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_API = "http://127.0.0.1:8470"
DEFAULT_TOKEN_FILE = Path("/run/portmesh/token")  # the API's own default
LAB_TOKEN_FILE = Path("/run/portmesh/lab/api.token")  # where the default lab keeps its API's token
DEFAULT_WAIT = 30.0


class ApiError(Exception):
    """The API refused, or could not be reached (``status`` 0)."""

    def __init__(self, status: int, field: str | None, reason: str, body: Any = None) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.status = status
        self.field = field
        self.reason = reason
        self.body = body

    def describe(self) -> str:
        """One line for stderr: what was wrong, and where."""
        where = f"{self.field}: " if self.field else ""
        code = f" (HTTP {self.status})" if self.status else ""
        hint = ""
        if self.status == 401:
            hint = "; set PORTMESH_TOKEN or --token-file to the API's token"
        elif self.status == 504:
            hint = "; the change is stored and applies as hosts catch up (see `portmesh status`)"
        return f"{where}{self.reason}{code}{hint}"


class TokenError(ValueError):
    """A token was found but cannot be one (binary, or with spaces or control characters inside)."""


def check_token(token: str, where: str) -> str:
    """A bearer token is printable ASCII without spaces; anything else would break the HTTP header."""
    if not all(33 <= ord(ch) <= 126 for ch in token):
        raise TokenError(f"{where} does not hold a token (printable ASCII without spaces expected)")
    return token


def read_token(path: Path) -> str | None:
    """The token from PORTMESH_TOKEN, else from ``path`` (by default also the default lab's); None if none is readable.

    Raises :class:`TokenError` for a token that is there but malformed: that is the user's
    mistake to hear about, not a 401 later or a failure inside the HTTP library.
    """
    token = os.environ.get("PORTMESH_TOKEN", "").strip()
    if token:
        return check_token(token, "PORTMESH_TOKEN")
    candidates = [path, LAB_TOKEN_FILE] if path == DEFAULT_TOKEN_FILE else [path]
    for candidate in candidates:
        try:
            text = candidate.read_bytes().decode("ascii").strip()
        except UnicodeDecodeError:
            raise TokenError(f"{candidate} does not hold a token (not ASCII text)") from None
        except OSError:  # absent, or not ours to read: the API will say 401
            continue
        return check_token(text, str(candidate)) if text else None
    return None


def valid_url(value: str) -> bool:
    """An http(s) URL with a host that httpx can use (checked before the first request, to say which setting is wrong)."""
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, ValueError, TypeError):
        return False
    return url.scheme in ("http", "https") and bool(url.host)


def quote_segment(value: str) -> str:
    """A path segment with nothing left that could change the path (``/``, ``..``)."""
    return quote(value, safe="")


@dataclass
class Api:
    """A thin wrapper over httpx that turns every non-2xx answer into :class:`ApiError`."""

    base_url: str
    token: str | None = None
    transport: httpx.BaseTransport | None = None

    def _client(self, timeout: float) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=self.transport)

    def request(
        self, method: str, path: str, *, json: Any = None, params: dict[str, str] | None = None, timeout: float = 10.0
    ) -> Any:
        try:
            with self._client(timeout) as client:
                r = client.request(method, path, json=json, params=params)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise ApiError(0, None, f"cannot reach the API at {self.base_url}: {exc}") from None
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.is_success:
            return body
        detail = body.get("detail") if isinstance(body, dict) else None
        if isinstance(detail, dict):
            raise ApiError(r.status_code, detail.get("field"), str(detail.get("reason", "")), body)
        raise ApiError(r.status_code, None, str(detail or r.text or r.reason_phrase), body)

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def write(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        wait: bool = False,
        wait_timeout: float = DEFAULT_WAIT,
        params: dict[str, str] | None = None,
    ) -> Any:
        """A mutating call; with ``wait`` the API answers once the change is live everywhere."""
        params = {**(params or {}), **({"wait": "true", "timeout": f"{wait_timeout:g}"} if wait else {})} or None
        # The HTTP timeout must outlast the API's own wait, so its 504 (with progress) reaches us.
        return self.request(method, path, json=json, params=params, timeout=wait_timeout + 10.0)
