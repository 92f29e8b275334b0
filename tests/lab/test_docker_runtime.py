"""Tier 3, image containers: a real lab whose agent runs containers through the Docker Engine API.

The engine is Podman's Docker-compatible service, which the lab starts (this
machine has no Docker daemon), and the image is the busybox one the lab builds
offline. Asserted on real traffic from ``inet``: the container is reachable
through its mapping with the client's real address; a ``docker restart`` (through
the SDK, behind portmesh's back) gives it a new network namespace that the agent
re-plumbs from the engine's events, with the same MAC and address; ``rm`` removes
the engine's container, the veth, the bridge port and every flow naming its MAC.

Both datapaths (the ``datapath`` fixture): on an eBPF host "the flows naming its MAC" are the
datapath's map entries carrying it (its port, its mapping's destination, its delivery entry).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest

from portmesh.lab import node, services
from portmesh.lab.network import PODMAN_LABEL, Lab, ovs_of
from portmesh.lab.state import LabState
from portmesh.runtime import docker as docker_runtime
from portmesh.runtime import procs
from portmesh.runtime.image import BUSYBOX_IMAGE
from tests.lab.conftest import lab_suffix
from tests.lab.tools import t4_ebpf

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(shutil.which("ovs-vswitchd") is None, reason="openvswitch-switch is not installed"),
    pytest.mark.skipif(
        shutil.which("podman") is None and docker_runtime.default_url() is None,
        reason="no container engine: podman is not installed and there is no Docker daemon",
    ),
]

IP = "203.0.113.30"
OUTSIDE_IP = "198.51.100.2"
# busybox httpd with a CGI that names the container and the client address it saw.
SERVE = (
    "mkdir -p /www/cgi-bin && "
    "printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\necho \"$(hostname) $REMOTE_ADDR\"\\n' > /www/cgi-bin/who && "
    "chmod +x /www/cgi-bin/who && echo serving on 80 && exec httpd -f -p 80 -h /www"
)


class Cloud:
    def __init__(self, state: LabState) -> None:
        self.state = state
        self.env = dict(os.environ, PORTMESH_API=state.api_url, PORTMESH_TOKEN_FILE=str(services.token_file(state.dir)))
        self.engine = docker_runtime.connect(state.docker_url, wait=10.0)

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "portmesh.cli.app", *args], env=self.env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, f"portmesh {' '.join(args)} failed ({done.returncode}): {done.stderr}"
        return done.stdout

    def api(self) -> httpx.Client:
        token = services.token_file(self.state.dir).read_text().strip()
        return httpx.Client(base_url=self.state.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def inspect(self, name: str) -> dict[str, object]:
        info: dict[str, object] = json.loads(self.cli("inspect", name, "-o", "json"))
        return info

    def status(self, name: str) -> dict[str, object]:
        status = self.inspect(name).get("status") or {}
        assert isinstance(status, dict)
        return status

    def wait_running(self, name: str, not_pid: object = None, timeout: float = 20.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        status: dict[str, object] = {}
        while time.monotonic() < deadline:
            status = self.status(name)
            if status.get("state") == "running" and status.get("pid") != not_pid:
                return status
            time.sleep(0.1)
        raise AssertionError(f"{name} never ran (again): {status}")

    def fetch(self, timeout: float = 2.0) -> str:
        done = node.run(["curl", "-s", "-m", str(timeout), f"http://{IP}/cgi-bin/who"], netns=self.state.ns("inet"), check=False)
        return done.stdout.strip()

    def wait_reachable(self, expect: str, timeout: float = 15.0) -> float:
        """Seconds until ``inet`` gets ``expect`` (name and client address) through the mapping (tries every ~20 ms)."""
        start = time.monotonic()
        while True:
            # httpd may have bound [::] before its IPv6 was turned off: the client is then [::ffff:IP].
            if self.fetch(0.1).replace("[::ffff:", "").replace("]", "") == expect:
                return time.monotonic() - start
            assert time.monotonic() - start < timeout, f"not reachable within {timeout}s"
            time.sleep(0.01)

    def eth0(self, netns: str) -> tuple[str, list[str]]:
        """(MAC, IPv4 addresses) of eth0 inside the container's namespace."""
        out = node.run(["ip", "-j", "addr", "show", "eth0"], netns=netns).stdout
        link = json.loads(out)[0]
        return link["address"], sorted(a["local"] for a in link["addr_info"] if a["family"] == "inet")

    def flows(self) -> list[str]:
        """h1's flows; on an eBPF host its map entries, each with the MACs it carries spelled out."""
        if self.state.datapath("h1") == "ebpf":
            return [f"{e} {' '.join(':'.join(f'{b:02x}' for b in m) for m in t4_ebpf.macs_of(e))}"
                    for e in t4_ebpf.entries(self.state, "h1")]
        ovs = ovs_of(self.state, "h1")
        out = node.run(["ovs-ofctl", "-O", "OpenFlow13", "dump-flows", "br0"], netns=ovs.netns, env=ovs.env()).stdout
        return [line.strip() for line in out.splitlines()[1:]]

    def host_links(self) -> list[str]:
        out = node.run(["ip", "-j", "link"], netns=self.state.ns("h1")).stdout
        return [str(link["ifname"]) for link in json.loads(out)]


@pytest.fixture(scope="module")
def cloud(datapath: str) -> Iterator[Cloud]:
    lab = Lab(f"dk{os.getpid() % 100000}{lab_suffix(datapath)}", say=lambda _msg: None)
    c: Cloud | None = None
    try:
        state = lab.up(hosts=1, datapath=datapath)
        assert state.docker_url, "the lab started no container engine"
        c = Cloud(state)
        yield c
    finally:
        if c is not None:
            c.engine.close()
        state_after = lab.state()
        if state_after is not None and (state_after.dir / "logs").exists():
            dest = Path("/tmp/portmesh-test-logs") / state_after.name
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(state_after.dir / "logs", dest)
        lab.down()


def test_image_container_reachable_restarted_and_removed(cloud: Cloud) -> None:
    name = "bbweb"
    ctr_name = docker_runtime.docker_name(cloud.state.prefix, name)
    # Through the API: restart policy "always" (a kill below must bring it back), env passed to the process.
    body = {
        "name": name,
        "host": "h1",
        "ips": [IP],
        "ports": [{"port": 80}],
        "image": BUSYBOX_IMAGE,
        "command": ["sh", "-c", "echo greeting=$GREETING; " + SERVE],
        "env": ["GREETING=hello world"],
        "restart": "always",
    }
    assert cloud.api().post("/v1/containers", json=body).status_code == 201
    first = cloud.wait_running(name)
    netns = str(first["netns"])
    assert netns.startswith("/proc/"), f"an image container's namespace is its process's: {netns}"
    assert first["runtime"] == "image" and first["restarts"] == 0
    logs = cloud.api().get(f"/v1/containers/{name}/logs").json()
    # `portmesh logs` reads the engine's log file, without the engine's line prefix; the answer says it runs.
    assert logs["text"].splitlines()[:2] == ["greeting=hello world", "serving on 80"], logs["text"][:300]
    assert logs["running"] is True

    # The engine made it as portmesh says: no network of its own, runc, labels naming it.
    attrs = cloud.engine.containers.get(ctr_name).attrs
    assert attrs["HostConfig"]["NetworkMode"] == "none"
    assert attrs["Config"]["Labels"][docker_runtime.LABEL_NAME] == name
    assert attrs["Config"]["Labels"][docker_runtime.LABEL_SCOPE] == cloud.state.prefix

    expect = f"{name} {OUTSIDE_IP}"  # the server sees the outside client's real address: no NAT
    cloud.wait_reachable(expect)
    info = cloud.inspect(name)
    mac_before, ips_before = cloud.eth0(netns)
    assert mac_before == info["mac"] and ips_before == [IP]

    # docker restart behind portmesh's back: a new namespace, re-plumbed from the engine's events.
    figures = []
    for _ in range(3):
        old_pid = cloud.status(name)["pid"]
        t0 = time.monotonic()
        restart_engine_container(cloud.engine, ctr_name)
        restarted = time.monotonic() - t0
        reachable = cloud.wait_reachable(expect)
        after = cloud.wait_running(name, not_pid=old_pid)
        mac_after, ips_after = cloud.eth0(str(after["netns"]))
        assert (mac_after, ips_after) == (mac_before, ips_before), "same MAC and addresses after the restart"
        figures.append((restarted, reachable))
    print("\nrestart call (s), then reachable from inet after it returned (s):", [f"{a:.2f}/{b:.2f}" for a, b in figures])

    # A crash (kill) is noticed the same way: under "always" the agent starts it again and plumbs the new namespace.
    # (A `docker restart` above may have been counted too: the agent can see the container exited between the
    # engine's stop and start and start it itself, as the policy says. So: one more than before the kill.)
    before = cloud.status(name)
    cloud.engine.containers.get(ctr_name).kill()
    again = cloud.wait_running(name, not_pid=before["pid"])
    assert again["restarts"] == int(str(before["restarts"])) + 1 and again["exit_code"] == 137, again
    print(f"killed: reachable again after {cloud.wait_reachable(expect):.2f}s")

    port = str(info["port_name"]) if "port_name" in info else None
    assert any(mac_before in flow for flow in cloud.flows())
    cloud.cli("rm", name)
    assert not cloud.engine.containers.list(all=True, filters={"name": ctr_name})
    if port:
        assert port not in cloud.host_links()
    assert not any(link.startswith("pm") and len(link) == 14 for link in cloud.host_links()), "no container veth left"
    assert not any(mac_before in flow for flow in cloud.flows()), "no flow names the removed container's MAC"
    assert cloud.fetch(0.5) == ""


def test_exited_container_stays_exited_under_restart_no(cloud: Cloud) -> None:
    """Docker's default policy: an exited process is not started again; its status says exited, with the code."""
    body = {
        "name": "once",
        "host": "h1",
        "ips": ["203.0.113.32"],
        "image": BUSYBOX_IMAGE,
        "command": ["sh", "-c", "echo bye; exit 3"],
    }
    assert cloud.api().post("/v1/containers", json=body).status_code == 201
    try:
        deadline = time.monotonic() + 20
        status: dict[str, object] = {}
        while time.monotonic() < deadline:
            status = cloud.status("once")
            if status.get("state") == "exited" and status.get("exit_code") is not None:
                break
            time.sleep(0.2)
        assert status.get("exit_code") == 3 and status.get("restarts") == 0, status
        state = cloud.engine.containers.get(docker_runtime.docker_name(cloud.state.prefix, "once")).attrs["State"]
        started = state["StartedAt"]
        # Several agent passes later (recheck every 5 s) it has still not been started again.
        time.sleep(6)  # a negative over time: no event to wait for; bounded by the agent's recheck interval
        after = cloud.engine.containers.get(docker_runtime.docker_name(cloud.state.prefix, "once")).attrs["State"]
        assert after["StartedAt"] == started and cloud.status("once").get("state") == "exited"
        logs = cloud.api().get("/v1/containers/once/logs").json()
        assert logs["text"] == "bye\n" and logs["running"] is False  # `logs -f` can stop
    finally:
        cloud.api().delete("/v1/containers/once")


def test_missing_image_is_an_error_not_a_hang(cloud: Cloud) -> None:
    cloud.cli("run", "noimg", "--host", "h1", "--ip", "203.0.113.31", "--image", "portmesh/absent:1", "--no-wait")
    deadline = time.monotonic() + 15
    status: dict[str, object] = {}
    while time.monotonic() < deadline:
        status = cloud.status("noimg")
        if status.get("state") == "error":
            break
        time.sleep(0.2)
    assert status.get("state") == "error" and "absent" in str(status.get("message")), status
    cloud.cli("rm", "noimg")


def test_down_removes_the_labs_containers_and_engine(datapath: str) -> None:
    lab = Lab(f"dkd{os.getpid() % 10000}{lab_suffix(datapath)}", say=lambda _msg: None)
    try:
        state = lab.up(hosts=1, datapath=datapath)
        c = Cloud(state)
        try:
            c.cli("run", "left", "--host", "h1", "--ip", "203.0.113.32", "--image", BUSYBOX_IMAGE, "--", "sleep", "1000")
            c.wait_running("left")
        finally:
            c.engine.close()
        podman = state.process(PODMAN_LABEL)
    finally:
        lab.down()
    if podman is not None:
        assert not procs.alive(podman.ref), "the lab's Podman service is stopped by its PID"
    engine = docker_runtime.default_url()
    if engine is not None:
        client = docker_runtime.connect(engine)
        try:
            labelled = client.containers.list(all=True, filters={"label": f"{docker_runtime.LABEL_SCOPE}={state.prefix}"})
            assert not labelled
        finally:
            client.close()
    else:
        out = subprocess.run(
            ["podman", "ps", "-a", "--filter", f"label={docker_runtime.LABEL_SCOPE}={state.prefix}", "-q"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert out.strip() == "", "no container of the lab is left in Podman's store"


def restart_engine_container(engine: docker.DockerClient, name: str, tries: int = 3) -> None:
    """``docker restart``, retried a bounded number of times: under load Podman's runc start
    occasionally fails with "runc start ... exit status 1" (seen once in ~10 runs), which is the
    engine's failure to restart, not portmesh's to re-plumb; what is asserted is the re-plumb."""
    for attempt in range(tries):
        try:
            engine.containers.get(name).restart(timeout=1)
            return
        except docker.errors.APIError:
            if attempt == tries - 1:
                raise
            time.sleep(1)
