"""The CLI in a real lab (issue 10, items 2, 3 and 9's CLI side): what follows ``--`` reaches the command as typed.

One lab (one host) for the module, named uniquely, taken down whatever happens. Every command
is the real ``portmesh`` console script in a subprocess, pointed at the lab only through what
``portmesh lab env`` prints (no default lab is involved).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from portmesh.lab import node
from portmesh.lab.network import Lab
from portmesh.lab.state import LabState
from tests.lab.conftest import lab_suffix

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(shutil.which("ovs-vswitchd") is None, reason="openvswitch-switch is not installed"),
]

PORTMESH = str(Path(sys.executable).parent / "portmesh")
IP = "203.0.113.77"


@pytest.fixture(scope="module")
def lab(datapath: str) -> Iterator[LabState]:
    made = Lab(f"cl{os.getpid() % 10000}{lab_suffix(datapath)}", say=print)
    try:
        yield made.up(hosts=1, tune_rmem=False, datapath=datapath)
    finally:
        made.down()


def pm(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PORTMESH_")}
    return subprocess.run([PORTMESH, *args], env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def lab_exec(lab: LabState, *argv: str) -> subprocess.CompletedProcess[str]:
    return pm("lab", "exec", "--name", lab.name, *argv)


def test_lab_exec_passes_everything_after_the_dashes(lab: LabState) -> None:
    r = lab_exec(lab, "inet", "--", "echo", "--name=ux", "hi")
    assert r.returncode == 0 and r.stdout == "--name=ux hi\n", r.stderr
    # -h/-n were taken as the lab's options ("lab 20000 is not up"): they must reach the command
    r = lab_exec(lab, "inet", "--", "printf", "%s\\n", "redis-benchmark", "-h", "203.0.113.10", "-n", "20000")
    assert r.stdout.split() == ["redis-benchmark", "-h", "203.0.113.10", "-n", "20000"], r.stderr
    r = lab_exec(lab, "inet", "--", "ping", "-n", "-c", "1", "127.0.0.1")
    assert r.returncode == 0 and "1 received" in r.stdout, r.stdout + r.stderr
    r = lab_exec(lab, "inet", "--", "ls", "--help")
    assert r.returncode == 0 and "portmesh" not in r.stdout and "ls" in r.stdout.splitlines()[0], r.stdout[:300]
    if shutil.which("tcpdump"):
        # tcpdump got "-ni pmnosuch0" (not the lab: "lab i is not up"): its own complaint about the interface
        r = lab_exec(lab, "inet", "--", "tcpdump", "-ni", "pmnosuch0", "-c", "1")
        assert r.returncode != 0 and "pmnosuch0" in r.stderr and "lab " not in r.stderr, r.stderr


def test_lab_exec_of_a_missing_command_is_one_line(lab: LabState) -> None:
    r = lab_exec(lab, "inet", "--", "nosuchcmd-pm", "x")
    assert r.returncode == 127 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: command: 'nosuchcmd-pm' not found in inet"]
    r = lab_exec(lab, "inet", "--", "true")  # positive control
    assert r.returncode == 0 and r.stderr == ""
    r = lab_exec(lab, "Not_A_Node", "--", "true")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "inet" in r.stderr, r.stderr


def lab_env(lab: LabState) -> dict[str, str]:
    r = pm("lab", "env", "--name", lab.name)
    assert r.returncode == 0, r.stderr
    env = {}
    for line in r.stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = shlex.split(value)[0]
    assert set(env) == {"PORTMESH_API", "PORTMESH_TOKEN_FILE"}
    return env


def test_lab_env_and_exec_into_a_container_of_a_named_lab(lab: LabState) -> None:
    env = lab_env(lab)
    assert env["PORTMESH_API"] == lab.api_url and Path(env["PORTMESH_TOKEN_FILE"]).is_file()
    r = pm("run", "cli1", "--host", "h1", "-p", f"{IP}:80/tcp", "--", "sleep", "300", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        # portmesh exec: found through this lab's API (not the default lab), entered here with nsenter
        r = pm("exec", "cli1", "--", "ip", "-o", "-4", "addr", "show", env=env)
        assert r.returncode == 0 and IP in r.stdout, r.stdout + r.stderr
        r = pm("exec", "cli1", "--", "echo", "--name=ux", "hi", env=env)
        assert r.stdout == "--name=ux hi\n", r.stderr
        # lab exec of a container hands over to portmesh exec with the lab's API
        r = lab_exec(lab, "cli1", "--", "ip", "-o", "-4", "addr", "show")
        assert r.returncode == 0 and IP in r.stdout, r.stdout + r.stderr
        # and inet, a lab node, does not hold the container's address (positive control for the above)
        r = lab_exec(lab, "inet", "--", "ip", "-o", "-4", "addr", "show")
        assert IP not in r.stdout
        r = pm("exec", "ghost1", "--", "true", env=env)
        assert r.returncode == 1 and "ghost1" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    finally:
        pm("rm", "cli1", env=env)


def test_exec_into_an_image_container_enters_its_filesystem_and_pids(lab: LabState) -> None:
    """Item 9: as docker exec does, not only the network namespace (cat /etc/os-release showed the host's)."""
    if not lab.docker_url:
        pytest.skip("this lab has no container engine")
    from portmesh.runtime.image import BUSYBOX_IMAGE

    assert Path("/etc/debian_version").exists(), "positive control: the host's filesystem has it"
    env = lab_env(lab)
    r = pm("run", "cli2", "--host", "h1", "--ip", IP, "--image", BUSYBOX_IMAGE, "--", "sleep", "300", env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        r = pm(
            "exec", "cli2", "--", "sh", "-c", "test -e /etc/debian_version; echo $?; cat /proc/1/cmdline | tr '\\0' ' '", env=env
        )
        assert r.returncode == 0, r.stderr
        missing, pid1 = r.stdout.splitlines()[:2]
        assert missing == "1", "the container's own root, not the host's"
        assert pid1.startswith("sleep 300"), f"PID 1 is the container's command: {pid1!r}"
        r = pm("exec", "cli2", "--", "ip", "-o", "-4", "addr", "show", env=env)
        assert IP in r.stdout, r.stdout + r.stderr
    finally:
        pm("rm", "cli2", env=env, timeout=120)


def test_lab_add_host_and_rm_host(lab: LabState, datapath: str, request: pytest.FixtureRequest) -> None:
    """A compute host joins the running lab and leaves it again, seen through the product's own `portmesh hosts`.

    It joins with the lab's datapath: an eBPF lab's new host runs the eBPF datapath, not OVS.
    """
    env = lab_env(lab)
    r = pm("lab", "add-host", "--name", lab.name)
    assert r.returncode == 0 and r.stdout == "h2\n", r.stdout + r.stderr
    joined = Lab(lab.name).state()
    joined_as = joined.datapath("h2") if joined is not None else "?"
    try:
        hosts = {h["name"]: h for h in json.loads(pm("hosts", "-o", "json", env=env).stdout)}
        assert hosts["h2"]["role"] == "compute" and hosts["h2"]["underlay_ip"] == "198.19.0.12", hosts
        assert hosts["h1"]["role"] == "gateway"
        r = pm("lab", "rm-host", "h1", "--name", lab.name)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "gateway" in r.stderr, r.stderr
        r = pm("lab", "rm-host", "h9", "--name", lab.name)
        assert r.returncode == 1 and r.stderr.startswith("error: HOST:") and "h9" in r.stderr, r.stderr
    finally:
        r = pm("lab", "rm-host", "h2", "--name", lab.name)
    assert r.returncode == 0, r.stderr
    assert [h["name"] for h in json.loads(pm("hosts", "-o", "json", env=env).stdout)] == ["h1"]
    assert not node.exists(lab.ns("h2"))
    assert joined_as == datapath, f"h2 joined the {datapath} lab running {joined_as}"
