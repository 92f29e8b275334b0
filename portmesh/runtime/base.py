"""The container runtime seen by the agent: a small protocol, so the light runtime
(a bare network namespace running a process) and a Docker/Podman runtime are
interchangeable.

The agent plumbs networking itself; a runtime only provides a network namespace
for a container and runs (or stops) the container's processes in it. That is
why :meth:`Runtime.prepare` exists next to ``start``: plumbing must happen in a
namespace that already exists, whether or not the container is meant to run.
"""

from __future__ import annotations

from typing import Protocol

from portmesh.model.entities import DEFAULT_STOP_TIMEOUT, Container, ContainerStatus


def netns_name(netns_prefix: str, container_name: str) -> str:
    """The network namespace a container gets: ``<prefix>c-<name>`` (docs/components.md)."""
    return f"{netns_prefix}c-{container_name}"


class Runtime(Protocol):
    """What the agent needs from a container runtime. Every method is idempotent.

    ``keeps_netns_when_stopped``: True if the namespace exists apart from the
    container's process (light runtime: plumbed before the process starts, kept
    while stopped); False if it is the process's own (Docker/Podman: it exists only
    while the container runs, and each start makes a new one, so the agent plumbs
    after ``start`` into ``ContainerStatus.netns`` and again whenever that changes).
    """

    keeps_netns_when_stopped: bool

    def prepare(self, container: Container, netns_prefix: str) -> str:
        """Ensure the container's network namespace exists; return its name (for plumbing)."""
        ...

    def start(self, container: Container, netns_prefix: str) -> ContainerStatus:
        """Ensure the container's process runs in its namespace (adopting a running one), within its
        restart policy: one that exited is started again only if ``container.restart`` says so."""
        ...

    def stop(self, name: str, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Ensure the container's process is not running (SIGTERM, SIGKILL after ``timeout`` s); its namespace is kept."""
        ...

    def status(self, name: str) -> ContainerStatus | None:
        """What the runtime knows of the container, or None if it knows nothing."""
        ...

    def remove(self, name: str) -> None:
        """Stop the container and forget it, namespace included."""
        ...

    def known(self) -> list[str]:
        """Names of every container this runtime has recorded (for tear-down after restarts)."""
        ...
