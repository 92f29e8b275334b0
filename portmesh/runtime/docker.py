"""Containers from images, through the Docker Engine API (``docker`` SDK).

A Docker daemon where there is one; elsewhere Podman's Docker-compatible
service (``podman system service``), which the lab starts. Containers are
created with networking off (``network_mode="none"``): the agent plumbs their
``eth0`` into the namespace of the container's main process, as it does for
light containers. On this machine Podman needs the ``runc`` runtime and lowered
ulimits (ARCHITECTURE.md), which Docker accepts as well, so both are always set.

Restart policy: done here, not by the engine (``RestartPolicy`` on create), so both
runtimes follow one rule (``portmesh.runtime.light.should_restart``) and count
restarts the same way, and so a Podman service (which restarts only while it
runs, and whose restarts make a namespace the agent must re-plumb) behaves as
Docker does. The agent asks on each pass; a process that ran less than
``RESTART_BACKOFF`` seconds waits for the next. Environment (``env``) is passed
at create; a change of image, command or env re-creates the container.

A container's network namespace belongs to its main process: every start
(``docker restart``, a crash and restart) makes a new, empty one. The runtime
watches the engine's event stream (never polling it) and wakes the agent, which
sees a different namespace in the status and plumbs it again with the same MAC
and addresses. What it learnt from ``inspect`` is cached until an event for that
container arrives, so the agent's passes cost no API calls.

Each container is recorded under ``state_dir/docker`` before it is created, and
labelled with the host and the scope (the lab's namespace prefix), so a
restarted agent and ``lab down`` find exactly the containers they made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types

from portmesh.model.entities import DEFAULT_STOP_TIMEOUT, Container, ContainerStatus, RunState
from portmesh.runtime.light import should_restart

log = logging.getLogger("portmesh.runtime.docker")

DOCKER_SOCKET = Path("/var/run/docker.sock")
LABEL_MANAGED = "io.portmesh.managed"
LABEL_NAME = "io.portmesh.container"
LABEL_HOST = "io.portmesh.host"
LABEL_SCOPE = "io.portmesh.scope"
LABEL_SPEC = "io.portmesh.spec"
OCI_RUNTIME = "runc"  # crun fails on this machine's hybrid cgroup layout; Docker's default is runc too
ULIMITS = (("nofile", 4096), ("nproc", 4096))  # higher limits are refused here (EPERM setting rlimits)
RUNTIME_KIND = "image"
# Engine answers to a start that raced another client's restart or stop (Podman, Docker): not an error.
BUSY = ("state improper", "is already in progress", "is restarting", "is marked for removal")
BUSY_STATES = ("stopping", "restarting", "removing")
RESTART_BACKOFF = 2.0  # a container that ran less than this is not restarted at once (crash loop)


def default_url() -> str | None:
    """The local Docker daemon's socket if there is one (else the caller names a Podman service)."""
    return f"unix://{DOCKER_SOCKET}" if DOCKER_SOCKET.exists() else None


def docker_name(scope: str, name: str) -> str:
    """The engine-side name: the lab's namespace naming (``<prefix>c-<name>``), ``portmesh-<name>`` outside a lab."""
    return f"{scope}c-{name}" if scope else f"portmesh-{name}"


def spec_of(c: Container) -> str:
    """A digest of what the container is made from; a different one means re-create."""
    parts: list[object] = [c.image, list(c.command)]
    if c.env:  # only when set, so containers made before env existed are not re-created
        parts.append(list(c.env))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def connect(url: str, timeout: float = 30.0, wait: float = 0.0) -> docker.DockerClient:
    """A client for the engine at ``url``, retrying for ``wait`` seconds while it is not up yet."""
    deadline = time.monotonic() + wait
    while True:
        try:
            client = docker.DockerClient(base_url=url, timeout=int(timeout))
            client.ping()
            return client
        except docker.errors.DockerException:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


_RFC3339 = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?$")


def _started_at(attrs: dict[str, Any]) -> float | None:
    """When the container last started, as a Unix time (engines give RFC 3339 with nanoseconds)."""
    found = _RFC3339.match(str(attrs.get("State", {}).get("StartedAt") or ""))
    if found is None or found.group(1).startswith("0001-"):
        return None
    whole, frac, zone = found.group(1), (found.group(2) or "0")[:6], found.group(3) or "Z"
    stamp = datetime.fromisoformat(f"{whole}.{frac}{'+00:00' if zone == 'Z' else zone}")
    return stamp.timestamp()


@dataclass(frozen=True)
class _Meta:
    """Kept in a container's record between agent passes and restarts (the engine knows none of it)."""

    restarts: int = 0  # starts by the restart policy since the last asked-for start
    stopped: bool = False  # the last word was a stop: the next start is asked for, not a policy restart
    starts: int = 0  # the container's ``starts`` last honoured (a change is a ``portmesh start``)
    exit_code: int | None = None  # the exit code before the last start (the engine resets its own on start)


@dataclass(frozen=True)
class _Seen:
    """What ``inspect`` said about one container."""

    id: str
    spec: str
    status: ContainerStatus
    started_at: float | None  # Unix time it last started (None: never started)
    busy: bool = False  # the engine is stopping, restarting or removing it (another client asked)

    def started_ago(self) -> float | None:
        return None if self.started_at is None else time.time() - self.started_at


class DockerRuntime:
    """Image containers through the Docker Engine API; see the module docstring."""

    keeps_netns_when_stopped = False

    def __init__(self, url: str, state_dir: Path, host: str, scope: str = "") -> None:
        self.url = url
        self.host = host
        self.scope = scope
        self._records = state_dir / "docker"
        self._records.mkdir(parents=True, exist_ok=True)
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()
        self._cache: dict[str, _Seen | None] = {}
        self._epoch = 0  # bumped by every event: an inspect that raced an event is not cached
        self._stream: Any = None  # the open event stream, closed by unwatch()

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = connect(self.url, wait=10.0)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- records and cache -----------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self._records / f"{name}.json"

    def known(self) -> list[str]:
        return sorted(p.stem for p in self._records.glob("*.json"))

    def _record(self, name: str, meta: _Meta | None = None) -> None:
        """The record: the engine-side name and what :class:`_Meta` keeps between passes and restarts."""
        m = meta or _Meta()
        tmp = self._path(name).with_suffix(".tmp")
        data = {"name": name, "docker_name": docker_name(self.scope, name), **dataclasses.asdict(m)}
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self._path(name))

    def _meta(self, name: str) -> _Meta:
        """What the record keeps; defaults if there is none or it predates a field."""
        try:
            data = json.loads(self._path(name).read_text())
        except (OSError, ValueError):
            return _Meta()
        code = data.get("exit_code")
        return _Meta(
            int(data.get("restarts", 0)),
            bool(data.get("stopped", False)),
            int(data.get("starts", 0)),
            int(code) if code is not None else None,
        )

    def _counted(self, name: str, status: ContainerStatus) -> ContainerStatus:
        """The engine's status with the restart count, and the last exit code once it runs again
        (the engine resets its ExitCode on start)."""
        meta = self._meta(name)
        code = status.exit_code if status.exit_code is not None or status.state != RunState.RUNNING else meta.exit_code
        return dataclasses.replace(status, restarts=meta.restarts, exit_code=code, runtime=RUNTIME_KIND)

    def forget(self, name: str | None = None) -> None:
        """Drop what is cached about ``name`` (every container if None): the next call inspects."""
        with self._lock:
            self._epoch += 1
            if name is None:
                self._cache.clear()
            else:
                self._cache.pop(name, None)

    def _inspect(self, name: str) -> _Seen | None:
        with self._lock:
            if name in self._cache:
                return self._cache[name]
            epoch = self._epoch
        try:
            ctr = self.client.containers.get(docker_name(self.scope, name))
            seen: _Seen | None = self._seen(ctr.attrs)
        except docker.errors.NotFound:
            seen = None
        with self._lock:
            if self._epoch == epoch:
                self._cache[name] = seen
        return seen

    @staticmethod
    def _seen(attrs: dict[str, Any]) -> _Seen:
        state = attrs.get("State", {})
        labels = attrs.get("Config", {}).get("Labels") or {}
        pid = int(state.get("Pid") or 0)
        # The engine's own log file (Podman: k8s-file lines, "TIME STREAM F text"), read by `portmesh logs`.
        log_path = str(attrs.get("LogPath") or "")
        started = _started_at(attrs) is not None
        code = int(state.get("ExitCode") or 0) if started else None
        if state.get("Running") and pid > 0:
            status = ContainerStatus(RunState.RUNNING, f"/proc/{pid}/ns/net", pid, "", log_path, runtime=RUNTIME_KIND)
        elif state.get("Error"):
            status = ContainerStatus(RunState.ERROR, "", None, str(state["Error"]), log_path, code, runtime=RUNTIME_KIND)
        else:
            message = f"{state.get('Status', 'exited')} (code {code})" if started else "created"
            status = ContainerStatus(RunState.EXITED, "", None, message, log_path, code, runtime=RUNTIME_KIND)
        busy = str(state.get("Status", "")) in BUSY_STATES
        return _Seen(str(attrs["Id"]), str(labels.get(LABEL_SPEC, "")), status, _started_at(attrs), busy)

    # -- Runtime protocol --------------------------------------------------------------

    def prepare(self, container: Container, netns_prefix: str) -> str:
        """The namespace of the running container (started if need be); it exists only while it runs."""
        status = self.start(container, netns_prefix)
        if status.state != RunState.RUNNING:
            raise RuntimeError(status.message or f"container {container.name} is not running")
        return status.netns

    def start(self, container: Container, netns_prefix: str) -> ContainerStatus:
        name = container.name
        seen = self._inspect(name)
        try:
            if seen is not None and seen.spec != spec_of(container):
                log.info("container %s: image or command changed, re-creating", name)
                self._remove_engine_side(name)
                seen = None
            if seen is None:
                self._create(container)
                seen = self._inspect(name)
                if seen is None:
                    return ContainerStatus(RunState.ERROR, "", None, "container vanished right after creation")
            if seen.status.state == RunState.RUNNING:
                return self._counted(name, seen.status)
            if seen.busy:
                # Someone else (``docker restart``) is at work on it: its next event wakes us.
                return self._counted(name, dataclasses.replace(seen.status, message=f"engine busy: {seen.status.message}"))
            meta = self._meta(name)
            if seen.started_at is not None and not meta.stopped and container.starts == meta.starts:
                # It ran and exited by itself: the restart policy decides.
                if not should_restart(container.restart, seen.status.exit_code):
                    return self._counted(name, seen.status)
                ago = seen.started_ago()
                if ago is not None and ago < RESTART_BACKOFF:
                    return self._counted(name, seen.status)
                meta = _Meta(meta.restarts + 1, False, meta.starts, seen.status.exit_code)
            else:
                # Never started, or stopped by us, or `portmesh start`: a start asked for.
                meta = _Meta(0, False, container.starts, seen.status.exit_code)
            self._record(name, meta)
            self.client.api.start(seen.id)
        except docker.errors.ImageNotFound:
            log.warning("container %s: image %s is not in the engine's local store", name, container.image)
            return ContainerStatus(RunState.ERROR, "", None, f"image {container.image!r} is not in the engine's local store")
        except docker.errors.APIError as exc:
            self.forget(name)
            reason = str(exc.explanation or exc)
            if any(word in reason for word in BUSY):
                # Someone else (``docker restart``) is starting or stopping it: its events will wake us.
                log.info("container %s is busy in the engine (%s); waiting for its events", name, reason)
                return ContainerStatus(RunState.EXITED, "", None, f"engine busy: {reason}")
            log.warning("container %s: engine refused: %s", name, reason)
            return ContainerStatus(RunState.ERROR, "", None, f"engine: {reason}")
        self.forget(name)
        after = self._inspect(name)
        return (
            self._counted(name, after.status)
            if after is not None
            else ContainerStatus(RunState.ERROR, "", None, "container vanished")
        )

    def _create(self, c: Container) -> None:
        if not c.image:
            raise ValueError(f"container {c.name} has no image: it belongs to the light runtime")
        self._record(c.name, _Meta(starts=c.starts))  # recorded before it exists, so a crash in between is cleaned up
        self.client.containers.create(
            c.image,
            list(c.command) or None,
            name=docker_name(self.scope, c.name),
            hostname=c.name,
            labels={
                LABEL_MANAGED: "true",
                LABEL_NAME: c.name,
                LABEL_HOST: self.host,
                LABEL_SCOPE: self.scope,
                LABEL_SPEC: spec_of(c),
            },
            environment=list(c.env) or None,
            network_mode="none",
            runtime=OCI_RUNTIME,
            ulimits=[docker.types.Ulimit(name=k, soft=v, hard=v) for k, v in ULIMITS],
            detach=True,
        )
        self.forget(c.name)
        log.info("container %s created from %s", c.name, c.image)

    def stop(self, name: str, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """``docker stop --time``: SIGTERM, SIGKILL after ``timeout`` s; the next start is a fresh one."""
        seen = self._inspect(name)
        if seen is None:
            return
        meta = self._meta(name)
        if not meta.stopped:
            self._record(name, dataclasses.replace(meta, stopped=True))
        if seen.status.state != RunState.RUNNING:
            return
        with contextlib.suppress(docker.errors.NotFound):
            self.client.api.stop(seen.id, timeout=int(timeout))
        self.forget(name)

    def status(self, name: str) -> ContainerStatus | None:
        seen = self._inspect(name)
        if seen is not None:
            return self._counted(name, seen.status)
        if self._path(name).exists():
            return ContainerStatus(RunState.EXITED, "", None, "not created yet")
        return None

    def remove(self, name: str) -> None:
        self._remove_engine_side(name)
        self._path(name).unlink(missing_ok=True)

    def _remove_engine_side(self, name: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            self.client.api.remove_container(docker_name(self.scope, name), force=True, v=True)
        self.forget(name)

    # -- events ------------------------------------------------------------------------

    def watch(self, wake: Callable[[], None], stop: threading.Event) -> threading.Thread:
        """Follow the engine's container events in a thread: forget what changed, then ``wake()``.

        Only this host's and scope's containers count. After a lost stream, everything
        cached is forgotten (an event may have been missed) and the agent woken.
        """

        def follow() -> None:
            while not stop.is_set():
                try:
                    client = connect(self.url, wait=0.0)
                    stream = client.events(decode=True, filters={"type": "container", "label": [f"{LABEL_SCOPE}={self.scope}"]})
                    self._stream = stream
                    self.forget()
                    wake()
                    for event in stream:
                        if stop.is_set():
                            break
                        self._on_event(event, wake)
                except Exception as exc:
                    if not stop.is_set():
                        log.warning("engine event stream lost (%s); reconnecting", exc)
                self.forget()
                stop.wait(1.0)

        thread = threading.Thread(target=follow, name="docker-events", daemon=True)
        thread.start()
        return thread

    def _on_event(self, event: dict[str, Any], wake: Callable[[], None]) -> None:
        attrs = event.get("Actor", {}).get("Attributes", {}) or {}
        if attrs.get(LABEL_HOST, self.host) != self.host or attrs.get(LABEL_SCOPE, self.scope) != self.scope:
            return
        name = attrs.get(LABEL_NAME)
        action = event.get("Action") or event.get("status")
        log.debug("engine event %s for %s", action, name)
        self.forget(str(name) if name else None)
        wake()

    def unwatch(self) -> None:
        """Close the event stream (the watching thread then ends once ``stop`` is set)."""
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.close()


def remove_scope(url: str, scope: str) -> list[str]:
    """Remove every portmesh container of ``scope`` (a lab's prefix) from the engine; their names."""
    client = connect(url, wait=5.0)
    removed = []
    try:
        for ctr in client.containers.list(all=True, filters={"label": [f"{LABEL_MANAGED}=true", f"{LABEL_SCOPE}={scope}"]}):
            labels = ctr.labels
            if labels.get(LABEL_SCOPE) != scope:
                continue
            ctr.remove(force=True, v=True)
            removed.append(str(labels.get(LABEL_NAME, ctr.name)))
    finally:
        client.close()
    return removed
