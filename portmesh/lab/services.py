"""The portmesh processes a lab runs (store, controller, agents, API), and talking to the API.

The argv builders are the single place that knows each component's command
line; the lab only decides where (which namespace) each one runs.
"""

from __future__ import annotations

import importlib.util
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

PY = sys.executable
CONTROLLER_IP = "198.18.0.1"  # the "control machine" (the mgmt namespace): controller and store listen here
CONTROLLER_PORT = 6653
STORE_PORT = 6640
UNDERLAY_DEV = "ul0"  # each lab host's underlay interface: the agents' --underlay-dev


def available(module: str) -> bool:
    """True if ``python -m module`` can run (components are written in parallel; the lab tolerates gaps)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def store_socket(labdir: Path) -> Path:
    return labdir / "store.sock"


def store_remote(labdir: Path) -> str:
    """The store as seen from the control machine (API, controller): its unix socket."""
    return f"unix:{store_socket(labdir)}"


def store_tcp_remote() -> str:
    """The store as the hosts see it: TCP on the management network (no socket is shared with a host namespace)."""
    return f"tcp:{CONTROLLER_IP}:{STORE_PORT}"


def store_argv(labdir: Path) -> list[str]:
    return [
        PY,
        "-m",
        "portmesh.store",
        "serve",
        "--db",
        str(labdir / "store.db"),
        "--socket",
        str(store_socket(labdir)),
        "--tcp",
        f"{CONTROLLER_IP}:{STORE_PORT}",
        "--log-file",
        str(labdir / "store.log"),
    ]


def controller_target(port: int = CONTROLLER_PORT) -> str:
    return f"tcp:{CONTROLLER_IP}:{port}"


def controller_argv(labdir: Path, store: str = "", listen: str = "", name: str = "") -> list[str]:
    """The controller; with --ha each of the two gets the cluster's remotes, its own port and ``--name``."""
    argv = [PY, "-m", "portmesh.controller", "--store", store or store_remote(labdir), "--listen", listen or controller_target()]
    return argv + (["--name", name] if name else [])


# -- the --ha lab: a 3-member Raft store and two controllers, all in the mgmt namespace --------------
# Member N (1..3) serves clients on 198.18.0.1:664N and talks Raft on 198.18.0.1:664(N+3);
# controller-N listens on 198.18.0.1:665(2+N). One address, so every port is the lab's own
# (each lab has its own mgmt namespace).
STORE_MEMBERS = 3
HA_CONTROLLERS = 2
STORE_DB_NAME = "Portmesh"  # the schema's name: ovs-appctl cluster/status takes it


def member_label(n: int) -> str:
    return f"store-{n}"


def member_client_port(n: int) -> int:
    return STORE_PORT + n


def member_raft_address(n: int) -> str:
    return f"tcp:{CONTROLLER_IP}:{STORE_PORT + STORE_MEMBERS + n}"


def member_db(labdir: Path, n: int) -> Path:
    return labdir / f"store-{n}.db"


def member_socket(labdir: Path, n: int) -> Path:
    return labdir / f"store-{n}.sock"


def member_ctl(labdir: Path, n: int) -> Path:
    """Member N's unixctl socket (``serve`` puts it next to the unix socket): for ``cluster/status``."""
    return member_socket(labdir, n).with_suffix(".ctl")


def cluster_tcp_remote() -> str:
    """Every member over TCP (controllers, agents): the clients follow the leader among them."""
    return ",".join(f"tcp:{CONTROLLER_IP}:{member_client_port(n)}" for n in range(1, STORE_MEMBERS + 1))


def cluster_unix_remote(labdir: Path) -> str:
    """Every member by its unix socket: for the API, which runs outside the mgmt namespace."""
    return ",".join(f"unix:{member_socket(labdir, n)}" for n in range(1, STORE_MEMBERS + 1))


def create_cluster_argv(labdir: Path) -> list[str]:
    return [PY, "-m", "portmesh.store", "create-cluster", "--db", str(member_db(labdir, 1)), "--local", member_raft_address(1)]


def join_cluster_argv(labdir: Path, n: int) -> list[str]:
    return [PY, "-m", "portmesh.store", "join-cluster", "--db", str(member_db(labdir, n)), "--local", member_raft_address(n),
            "--remote", member_raft_address(1)]


def member_argv(labdir: Path, n: int) -> list[str]:
    return [
        PY, "-m", "portmesh.store", "serve",
        "--db", str(member_db(labdir, n)),
        "--socket", str(member_socket(labdir, n)),
        "--tcp", f"{CONTROLLER_IP}:{member_client_port(n)}",
        "--log-file", str(labdir / f"store-{n}.log"),
    ]  # fmt: skip


def controller_label(n: int) -> str:
    return f"controller-{n}"


def ha_controller_target(n: int) -> str:
    return controller_target(CONTROLLER_PORT + n - 1)


def ha_controller_targets() -> str:
    return ",".join(ha_controller_target(n) for n in range(1, HA_CONTROLLERS + 1))


def takes_flag(module: str, flag: str, text: str = "") -> bool:
    """True if ``python -m module --help`` mentions ``flag`` (and ``text``, when given).

    The components grow flags in parallel with the lab (the controller's --name, the agent's
    list of controllers): the lab passes a flag only to a component that knows it.
    """
    try:
        out = subprocess.run([PY, "-m", module, "--help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return flag in out and text in out


def podman_socket(labdir: Path) -> Path:
    return labdir / "podman.sock"


def podman_argv(labdir: Path) -> list[str]:
    """Podman's Docker-compatible service for the lab's image containers (no Docker daemon here).

    ``--runtime runc``: crun fails on this machine's hybrid cgroup layout (ARCHITECTURE.md).
    ``--time=0``: it serves until the lab stops it by its PID.
    """
    return ["podman", "--runtime", "runc", "system", "service", "--time=0", f"unix://{podman_socket(labdir)}"]


def agent_argv(
    labdir: Path, host: str, ovsdb_remote: str, prefix: str, docker_url: str = "", store: str = "", controller: str = "",
    uplink: str = "", datapath: str = "ovs", bpf_dir: Path | None = None,
) -> list[str]:
    """The agent as its systemd unit runs it on a real host: store and controller over TCP, its underlay device,
    and on the gateway host its ``--uplink`` (inbound pool traffic taken by the switch, docs/deploy.md)."""
    return [
        PY,
        "-m",
        "portmesh.agent",
        "--host",
        host,
        "--store",
        store or store_tcp_remote(),
        # An eBPF host has no OVS and no controller: its agent loads the datapath itself.
        *(["--datapath", "ebpf", "--bpf-dir", str(bpf_dir or labdir / host / "bpf")] if datapath == "ebpf" else
          ["--ovsdb", ovsdb_remote, "--controller", controller or controller_target()]),
        "--netns-prefix",
        prefix,
        "--state-dir",
        str(agent_state_dir(labdir, host)),
        "--docker-url",
        docker_url or "none",
        "--underlay-dev",
        UNDERLAY_DEV,
        *(["--uplink", uplink] if uplink else []),
    ]


def agent_state_dir(labdir: Path, host: str) -> Path:
    return labdir / host / "agent"


def api_argv(labdir: Path, port: int, store: str = "") -> list[str]:
    return [
        PY,
        "-m",
        "portmesh.api",
        "--store",
        store or store_remote(labdir),
        "--listen",
        f"127.0.0.1:{port}",
        "--token-file",
        str(token_file(labdir)),
    ]


def token_file(labdir: Path) -> Path:
    return labdir / "api.token"


def make_token(labdir: Path) -> str:
    """A fresh API token for this lab, written 0600 (the API reads it, the lab uses it to register hosts)."""
    path = token_file(labdir)
    token = secrets.token_urlsafe(32)
    path.touch(mode=0o600, exist_ok=False)
    path.write_text(token + "\n")
    return token


DEFAULT_LAB = "lab"
DEFAULT_API_PORT = 8470  # the CLI's default API address; the default lab takes it when it is free


def free_port(preferred: int = 0) -> int:
    """A TCP port free on loopback right now (for the lab's API): ``preferred`` if it is free."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 20.0) -> None:
    """Wait until ``GET url`` answers at all (any status)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=2.0)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout:.0f} s") from None
            time.sleep(0.2)


class ApiClient:
    """The few API calls the lab makes."""

    def __init__(self, base_url: str, token: str = "") -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=15.0)

    def register_host(self, name: str, datapath_id: int, underlay_ip: str | None = None, role: str = "") -> None:
        """``POST /v1/hosts`` as ``portmesh host add NAME --underlay-ip IP --role ROLE`` does."""
        body: dict[str, Any] = {"name": name, "datapath_id": datapath_id}
        if underlay_ip:
            body["underlay_ip"] = underlay_ip
        if role:
            body["role"] = role
        reply = self.http.post("/v1/hosts", json=body)
        if reply.status_code not in (200, 201, 409):
            raise RuntimeError(f"POST /v1/hosts {name}: {reply.status_code} {reply.text}")

    def remove_host(self, name: str) -> None:
        """``DELETE /v1/hosts/NAME`` (``portmesh host rm``): the other hosts drop their tunnels to it."""
        reply = self.http.delete(f"/v1/hosts/{name}")
        if reply.status_code not in (200, 204, 404):
            raise RuntimeError(f"DELETE /v1/hosts/{name}: {reply.status_code} {reply.text}")

    def container_netns(self, name: str) -> str:
        reply = self.http.get(f"/v1/containers/{name}")
        if reply.status_code == 404:
            raise LookupError(f"no container {name!r}")
        reply.raise_for_status()
        status = reply.json().get("status") or {}
        netns = str(status.get("netns") or "")
        if not netns:
            raise LookupError(f"container {name!r} has no network namespace yet (status: {status})")
        return netns
