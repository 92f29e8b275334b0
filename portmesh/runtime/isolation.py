"""What a light container sees of the host's filesystem: everything but portmesh's secrets and state.

A light container is a process in a network namespace of its own. Before this
module it also shared the host's mount table and started in ``/``, so the
README's first example, ``python3 -m http.server 80``, served the whole host to
the internet, the API token in ``/run/portmesh/<lab>/api.token`` included.

Now each light container's process, between ``fork`` and ``exec``:

1. enters its own mount namespace (``unshare(CLONE_NEWNS)``) with every mount
   made private, so nothing it mounts reaches the host and back;
2. gets an empty, private tmpfs over each directory that holds portmesh's
   secrets or state (:data:`HIDDEN_DIRS`: API tokens, the store's database and
   socket, the lab's state and logs, the agents' records, Docker's and Podman's
   sockets), plus the agent's own state directory wherever it is;
3. gets its own working directory, ``<state dir>/work/<name>`` on the host
   (kept across restarts, removed with the container), bind-mounted back at the
   same path inside the hidden tree, and starts there: ``http.server`` serves
   that directory and nothing else;
4. gets an environment of its own (``PATH``, ``HOME``, ``HOSTNAME`` and the
   container's ``env``), never the agent's (which may hold ``PORTMESH_TOKEN``).

What it still shares with the host, said plainly (docs/components.md): the rest
of the filesystem, read-write; the users (it runs as root); the PID, IPC and UTS
namespaces. Root in a container can undo a mount in its own namespace and reach
the host's files through ``/proc/<pid>/root`` of a host process, so this guards
against *exposing* secrets by accident (a file server, a ``tar`` of ``/``), not
against a hostile process: run untrusted code as an image container.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNS = 0x00020000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

# Where portmesh and the engines it drives keep secrets and state on a host (only those that exist
# are hidden). /run/portmesh: the lab's and the API's tokens, the store's socket and database, lab
# state and logs; /var/lib/portmesh: agents' records; /etc/portmesh: configuration; the engine
# sockets: whoever reaches them is root on the host.
HIDDEN_DIRS: tuple[str, ...] = (
    "/run/portmesh",
    "/var/lib/portmesh",
    "/etc/portmesh",
    "/run/docker",
    "/run/podman",
    "/var/run/docker.sock",
)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode(), target.encode(), fstype.encode() if fstype else None, flags, data.encode() if data else None
        ),
        f"mount {target}",
    )


@dataclass(frozen=True)
class Isolation:
    """How one light container's process is set up before ``exec`` (see the module docstring)."""

    workdir: Path  # on the host: <state dir>/work/<name>
    hidden: tuple[str, ...]  # directories covered with an empty tmpfs

    @classmethod
    def for_container(cls, state_dir: Path, name: str, extra_hidden: Iterable[str] = ()) -> Isolation:
        hidden = [*HIDDEN_DIRS, str(state_dir.resolve()), *extra_hidden]
        return cls(state_dir.resolve() / "work" / name, tuple(dict.fromkeys(hidden)))

    def prepare(self) -> None:
        """In the parent: make the working directory (the child cannot once its parents are hidden)."""
        self.workdir.mkdir(mode=0o755, parents=True, exist_ok=True)

    def enter(self) -> None:
        """In the child, before ``exec``: own mount namespace, secrets hidden, working directory entered.

        Runs between fork and exec (``preexec_fn``): only system calls, no locks, no logging.
        """
        _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _mount("none", "/", None, MS_REC | MS_PRIVATE)
        # Opened in the new namespace (a bind source must be a mount of the caller's namespace), before
        # the tmpfs covers its path: the fd still reaches it afterwards.
        workdir_fd = os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY)
        covered: list[str] = []
        for path in self.hidden:
            # A directory inside one already covered is gone with it; a socket file is covered by its directory's tmpfs
            # when it lies in one, else by an empty file bind (a tmpfs cannot go over a non-directory).
            if any(path == c or path.startswith(c.rstrip("/") + "/") for c in covered):
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
                covered.append(path)
            elif os.path.exists(path):
                _mount("/dev/null", path, None, MS_BIND)
        target = str(self.workdir)
        os.makedirs(target, mode=0o755, exist_ok=True)  # inside the fresh tmpfs, if the tree is hidden
        _mount(f"/proc/self/fd/{workdir_fd}", target, None, MS_BIND)
        os.close(workdir_fd)
        os.chdir(target)


def environment(name: str, env: Iterable[str]) -> dict[str, str]:
    """A container's environment: Docker's defaults (``PATH``, ``HOSTNAME``, ``HOME``) then its ``KEY=VALUE``s."""
    out = {"PATH": DEFAULT_PATH, "HOSTNAME": name, "HOME": "/root"}
    for item in env:
        key, _, value = item.partition("=")
        out[key] = value
    return out
