"""Tier 1 for the Docker/Podman runtime and the offline busybox image: no engine, no root."""

from __future__ import annotations

import dataclasses
import io
import tarfile
import time
import types
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from portmesh.model.entities import Container, PortBlock, RestartPolicy, RunState
from portmesh.runtime import docker as dr
from portmesh.runtime.image import find_busybox, rootfs_tar


def container(image: str | None = "portmesh/busybox:latest", command: tuple[str, ...] = ("sleep", "1")) -> Container:
    return Container("web", "h1", "02:00:00:00:00:01", (IPv4Address("203.0.113.5"),), PortBlock(32768, 1024), command, image)


def test_names_follow_the_lab_prefix() -> None:
    assert dr.docker_name("pm-x-", "web") == "pm-x-c-web"
    assert dr.docker_name("", "web") == "portmesh-web"


def test_spec_changes_with_image_or_command_only() -> None:
    assert dr.spec_of(container()) == dr.spec_of(container())
    assert dr.spec_of(container()) != dr.spec_of(container(command=("sleep", "2")))
    assert dr.spec_of(container()) != dr.spec_of(container(image="other:1"))


@pytest.mark.parametrize(
    "stamp",
    ["2026-11-25T13:52:29.123456789Z", "2026-11-25T13:52:29Z", "2026-11-25T13:52:29.5+00:00"],
)
def test_engine_timestamps_parse(stamp: str) -> None:
    started = dr._started_at({"State": {"StartedAt": stamp}})
    assert started is not None and abs(started - 1795614749) < 1


def test_never_started_has_no_start_time() -> None:
    assert dr._started_at({"State": {"StartedAt": "0001-01-01T00:00:00Z"}}) is None
    assert dr._started_at({"State": {}}) is None


def test_inspect_maps_to_status() -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    running = dr.DockerRuntime._seen(
        {"Id": "abc", "State": {"Running": True, "Pid": 42, "Status": "running", "StartedAt": now}, "Config": {"Labels": {}}}
    )
    assert running.status.state == RunState.RUNNING and running.status.netns == "/proc/42/ns/net"
    stopping = dr.DockerRuntime._seen({"Id": "abc", "State": {"Running": False, "Status": "stopping"}, "Config": {}})
    assert stopping.busy and stopping.status.state == RunState.EXITED


def test_rootfs_has_static_busybox_and_applets() -> None:
    try:
        find_busybox()
    except FileNotFoundError:
        pytest.skip("busybox-static is not installed")
    with tarfile.open(fileobj=io.BytesIO(rootfs_tar())) as tar:
        names = set(tar.getnames())
        assert {"bin/busybox", "bin/sh", "bin/httpd", "bin/nc", "etc/passwd", "tmp"} <= names
        sh = tar.getmember("bin/sh")
        assert sh.issym() and sh.linkname == "busybox"
        assert tar.getmember("tmp").mode == 0o1777


def test_runtime_records_before_creating(tmp_path: Path) -> None:
    rt = dr.DockerRuntime("unix:///nonexistent.sock", tmp_path, "h1", "pm-x-")
    assert rt.known() == []  # known() reads the records only: no engine needed
    rt._record("web")
    assert rt.known() == ["web"]


# --- restart policy, exit codes, env, stop timeout: against a fake engine ---


class FakeEngine:
    """The few Engine API calls the runtime makes, over one container's inspect attributes."""

    def __init__(self) -> None:
        self.attrs: dict[str, Any] | None = None
        self.created: dict[str, Any] = {}
        self.starts = 0
        self.stops: list[int | None] = []
        self.containers = self
        self.api = self

    # client.containers.*
    def get(self, _name: str) -> Any:
        if self.attrs is None:
            raise docker.errors.NotFound("no such container")
        return types.SimpleNamespace(attrs=self.attrs)

    def create(self, image: str, command: Any, **kwargs: Any) -> None:
        self.created = {"image": image, "command": command, **kwargs}
        self.attrs = {"Id": "c0ffee", "State": {"Status": "created"}, "Config": {"Labels": kwargs["labels"]}}

    # client.api.*
    def start(self, _id: str) -> None:
        self.starts += 1
        self.run()

    def stop(self, _id: str, timeout: int | None = None) -> None:
        self.stops.append(timeout)
        self.exit(143)

    def run(self) -> None:
        assert self.attrs is not None
        self.attrs["State"] = {"Running": True, "Pid": 4242, "Status": "running", "StartedAt": "2020-01-01T00:00:00Z"}

    def exit(self, code: int) -> None:
        assert self.attrs is not None
        self.attrs["State"] = {"Running": False, "Status": "exited", "ExitCode": code, "StartedAt": "2020-01-01T00:00:00Z"}


def fake_runtime(tmp_path: Path) -> tuple[dr.DockerRuntime, FakeEngine]:
    rt = dr.DockerRuntime("unix:///nonexistent.sock", tmp_path, "h1", "pm-x-")
    engine = FakeEngine()
    rt._client = engine
    return rt, engine


@pytest.mark.parametrize(
    ("policy", "code", "restarted"),
    [
        (RestartPolicy.NO, 1, False),
        (RestartPolicy.ON_FAILURE, 1, True),
        (RestartPolicy.ON_FAILURE, 0, False),
        (RestartPolicy.ALWAYS, 0, True),
    ],
)
def test_restart_policy_decided_by_the_runtime(tmp_path: Path, policy: RestartPolicy, code: int, restarted: bool) -> None:
    rt, engine = fake_runtime(tmp_path)
    c = dataclasses.replace(container(), restart=policy, env=("A=1", "B=x y"))
    first = rt.start(c, "pm-x-")
    assert first.state == RunState.RUNNING and first.pid == 4242 and first.runtime == "image" and first.restarts == 0
    assert engine.created["environment"] == ["A=1", "B=x y"]
    assert "restart_policy" not in engine.created  # the engine does not restart it on its own
    engine.exit(code)
    rt.forget()
    exited = rt.status("web")
    assert exited is not None and exited.state == RunState.EXITED and exited.exit_code == code
    again = rt.start(c, "pm-x-")  # the agent's next pass
    assert engine.starts == (2 if restarted else 1)
    assert again.restarts == (1 if restarted else 0)
    assert (again.state == RunState.RUNNING) is restarted
    assert again.exit_code == code  # running again, it still shows how it last exited (the engine forgot)
    if not restarted:
        # `portmesh start` of the exited container (``starts`` counted by the store): started whatever the policy.
        asked = rt.start(dataclasses.replace(c, starts=1), "pm-x-")
        assert asked.state == RunState.RUNNING and asked.restarts == 0 and engine.starts == 2


def test_stop_uses_the_timeout_and_a_later_start_is_fresh(tmp_path: Path) -> None:
    rt, engine = fake_runtime(tmp_path)
    c = dataclasses.replace(container(), restart=RestartPolicy.NO)
    rt.start(c, "pm-x-")
    rt.stop("web", timeout=3)
    assert engine.stops == [3]
    rt.forget()
    stopped = rt.status("web")
    assert stopped is not None and stopped.state == RunState.EXITED and stopped.exit_code == 143
    # Under "no" an exited container stays exited, but a stop then a start is asked for: it runs.
    assert rt.start(c, "pm-x-").state == RunState.RUNNING and engine.starts == 2


def test_env_is_part_of_the_spec_only_when_set() -> None:
    plain = container()
    assert dr.spec_of(plain) == dr.spec_of(dataclasses.replace(plain, restart=RestartPolicy.ALWAYS))
    assert dr.spec_of(plain) != dr.spec_of(dataclasses.replace(plain, env=("A=1",)))
