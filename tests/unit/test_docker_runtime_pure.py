"""Tier 1 for the Docker/Podman runtime and the offline busybox image: no engine, no root."""

from __future__ import annotations

import io
import tarfile
import time
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from portmesh.model.entities import Container, PortBlock, RunState
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
