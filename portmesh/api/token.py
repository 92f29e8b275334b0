"""The API's bearer token: from the environment, else a file made on first start.

The token is never logged or printed; only the path of its file is. The file is
created with mode 0600 atomically (``O_EXCL``), so it is never readable by others,
not even for an instant, and two starting processes cannot both write one.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

ENV_VAR = "PORTMESH_TOKEN"
DEFAULT_TOKEN_FILE = Path("/run/portmesh/token")


def load_or_create_token(path: Path = DEFAULT_TOKEN_FILE, env: dict[str, str] | None = None) -> tuple[str, bool]:
    """The token and whether it was just generated (written to ``path``)."""
    environ = os.environ if env is None else env
    from_env = environ.get(ENV_VAR, "").strip()
    if from_env:
        return from_env, False
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing, False
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # an empty file, or another process won the race: use what is there
        existing = path.read_text().strip()
        if existing:
            return existing, False
        path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, True
