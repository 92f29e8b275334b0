"""``portmesh demo``: a 3-host lab, four containers on two shared public IPs, and the outside world reaching each.

h1 is the gateway host (the only one facing ``inet``), h2 and h3 compute hosts
joined by a VXLAN mesh; each public IP is shared by containers on different hosts.

Everything goes through the product path: the containers are created through the
API (as ``portmesh run`` does), the agent plumbs them, the controller programs
OVS; then a real client in the lab's ``inet`` namespace (curl for HTTP, a UDP
socket for DNS-like traffic) reaches every mapping and prints what the server
saw, which shows the client's real address and the public destination address.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import httpx

from portmesh.lab import node, services
from portmesh.lab.network import Lab
from portmesh.lab.state import LabState

Say = Callable[[str], None]

HOSTS = 3
# (name, host, public IP, whoami arguments, ports to map)
SAMPLES: list[tuple[str, str, str, list[str], list[dict[str, Any]]]] = [
    ("web1", "h1", "203.0.113.10", ["--http", "80"], [{"port": 80, "proto": "tcp"}]),
    ("web2", "h2", "203.0.113.10", ["--http", "8080"], [{"port": 8080, "proto": "tcp"}]),
    ("web3", "h3", "203.0.113.11", ["--http", "80"], [{"port": 80, "proto": "tcp"}]),
    ("dns1", "h2", "203.0.113.11", ["--udp", "53"], [{"port": 53, "proto": "udp"}]),
]

UDP_PROBE = (
    "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(3); "
    "s.sendto(b'hi',(sys.argv[1],int(sys.argv[2]))); print(s.recv(200).decode().strip())"
)


def run_demo(name: str, say: Say = print, datapath: str = "ovs") -> LabState:
    """Bring the lab up, create the sample containers and show each mapping answering from ``inet``.

    ``datapath``: what the hosts run (``ovs``, ``ebpf``, or per host, as ``lab up --datapath``)."""
    lab = Lab(name, say=say)
    if lab.state() is not None:
        raise RuntimeError(f"lab {name!r} is already up: `portmesh lab down --name {name}` first, or pick --name")
    state = lab.up(hosts=HOSTS, datapath=datapath)
    if not state.api_url:
        raise RuntimeError("the lab has no API; cannot create containers")
    token = services.token_file(state.dir).read_text().strip()
    api = httpx.Client(base_url=state.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    for cname, host, ip, args, ports in SAMPLES:
        command = [sys.executable, "-m", "portmesh.lab.whoami", "--name", cname, *args]
        body = {"name": cname, "host": host, "ips": [ip], "ports": ports, "command": command}
        reply = api.post("/v1/containers", params={"wait": "true"}, json=body)
        if reply.status_code != 201:
            raise RuntimeError(f"creating {cname}: HTTP {reply.status_code} {reply.text}")
        say(f"portmesh run {cname} --host {host} --ip {ip} " + " ".join(f"-p {p['port']}/{p['proto']}" for p in ports))
    wait_running(api, [s[0] for s in SAMPLES])
    say("")
    say("hosts (portmesh hosts):")
    for h in wait_mesh(api):
        up = sum(1 for t in h.get("tunnels") or [] if t.get("state") == "up")
        say(f"  {h['name']}  {h.get('role', '-'):<8} underlay {h.get('underlay_ip') or '-':<12} "
            f"tunnels {up}/{len(h.get('tunnels') or [])} up  containers {h.get('containers', '-')}")
    say("")
    say("mapping table (portmesh map ls):")
    for m in sorted(api.get("/v1/mappings").json(), key=lambda m: (m["public_ip"], m["port"])):
        say(f"  {m['public_ip']:>15}  {m['port']:>5}/{m['proto']}  ->  {m['container']}")
    say("")
    inet = state.ns("inet")
    for _cname, _host, ip, _args, ports in SAMPLES:
        for p in ports:
            if p["proto"] == "tcp":
                url = f"http://{ip}:{p['port']}/"
                answer = node.run(["curl", "-s", "--max-time", "5", url], netns=inet, check=False).stdout.strip()
                say(f"inet$ curl {url}\n  {answer or '(no answer)'}")
            else:
                probe = node.run([sys.executable, "-c", UDP_PROBE, ip, str(p["port"])], netns=inet, check=False)
                say(f"inet$ udp {ip}:{p['port']}\n  {probe.stdout.strip() or '(no answer)'}")
    refused = node.run(["curl", "-s", "-o", "/dev/null", "-w", "%{exitcode} after %{time_total}s",
                        "--max-time", "5", "http://203.0.113.10:9999/"], netns=inet, check=False).stdout
    say(f"inet$ curl http://203.0.113.10:9999/   (unmapped)\n  refused: curl exit {refused}")
    say("")
    say(f"The lab stays up: try `portmesh lab exec --name {name} inet -- curl http://203.0.113.10:8080/`;")
    say(f"remove everything with `portmesh lab down --name {name}`.")
    return state


def wait_mesh(api: httpx.Client, timeout: float = 30) -> list[dict[str, Any]]:
    """The hosts once every agent reports its tunnels to all the others up (or, after ``timeout``, as they are)."""
    deadline = time.monotonic() + timeout
    while True:
        hosts: list[dict[str, Any]] = api.get("/v1/hosts").json()
        meshed = all(
            len(h.get("tunnels") or []) == len(hosts) - 1 and all(t.get("state") == "up" for t in h.get("tunnels") or [])
            for h in hosts
        )
        if meshed or time.monotonic() > deadline:
            return hosts
        time.sleep(0.2)


def wait_running(api: httpx.Client, names: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending:
        for cname in list(pending):
            status = api.get(f"/v1/containers/{cname}").json().get("status") or {}
            if status.get("state") == "running":
                pending.discard(cname)
            elif status.get("state") == "error":
                raise RuntimeError(f"{cname} failed: {status.get('message')}")
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"containers not running after {timeout}s: {sorted(pending)}")
        time.sleep(0.2)
