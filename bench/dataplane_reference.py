"""The reference paths of bench/dataplane, each built from plain Linux and OVS parts in namespaces
the run owns: what portmesh is compared with.

  direct       a veth pair, client <-> server (the limit);
  bridge_dnat  the iptables DNAT and Linux bridge Docker sets up for ``-p``;
  ovs_ctnat    one userspace OVS with conntrack DNAT flows, the OVN load-balancer shape.

Each function builds its path through the :class:`~dataplane_bench.Bench` (which records every
namespace and process for cleanup) and returns where to measure it.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from dataplane_common import (
    CLI_MAC,
    CLIENT_IP,
    GW_MAC,
    HTTP_PORT,
    IPERF_PORT,
    OUTSIDE_GW,
    PRIVATE_GW,
    PRIVATE_IP,
    PUBLIC_IP,
    PUBLISHED_HTTP,
    SRV_MAC,
    BenchError,
    Target,
)

if TYPE_CHECKING:
    from dataplane_bench import Bench


def direct(bench: Bench) -> Target:
    """(a) A veth pair, client to server: the limit."""
    cli = bench.client_ns("a-cli")
    srv = bench.ns("a-srv")
    bench.veth(cli, "eth0", srv, "eth0")
    bench.addr(cli, "eth0", f"{CLIENT_IP}/24")
    bench.addr(srv, "eth0", f"{OUTSIDE_GW}/24")
    bench.start_servers(srv, "a")
    return Target(cli, OUTSIDE_GW, HTTP_PORT, IPERF_PORT)


def bridge_dnat(bench: Bench) -> Target:
    """(b) Docker's ``-p``: iptables DNAT in the host namespace, then a Linux bridge to the container."""
    cli = bench.client_ns("b-cli")
    host = bench.ns("b-host")
    srv = bench.ns("b-srv")
    bench.veth(cli, "eth0", host, "up0")
    bench.addr(cli, "eth0", f"{CLIENT_IP}/24")
    bench.run(["ip", "-n", cli, "route", "add", "203.0.113.0/24", "via", OUTSIDE_GW])
    bench.addr(host, "up0", f"{OUTSIDE_GW}/24")
    bench.addr(host, "up0", f"{PUBLIC_IP}/32")  # the host's public address, where -p publishes
    bench.run(["ip", "-n", host, "link", "add", "br0", "type", "bridge"])
    bench.run(["ip", "-n", host, "link", "set", "br0", "up"])
    bench.addr(host, "br0", f"{PRIVATE_GW}/24")
    bench.veth(host, "vethsrv", srv, "eth0")
    bench.run(["ip", "-n", host, "link", "set", "vethsrv", "master", "br0"])
    bench.addr(srv, "eth0", f"{PRIVATE_IP}/24")
    bench.run(["ip", "-n", srv, "route", "add", "default", "via", PRIVATE_GW])
    bench.sysctl(host, "net.ipv4.ip_forward", "1")
    # What dockerd writes for `docker run -p 8080:80 -p 5201:5201` on bridge br0 (iptables backend).
    published = ((PUBLISHED_HTTP, HTTP_PORT), (IPERF_PORT, IPERF_PORT))  # host port -> container port
    rules = [
        ["-t", "nat", "-N", "DOCKER"],
        ["-t", "nat", "-A", "PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "DOCKER"],
        ["-t", "nat", "-A", "POSTROUTING", "-s", "198.18.0.0/24", "!", "-o", "br0", "-j", "MASQUERADE"],
        ["-t", "nat", "-A", "DOCKER", "-i", "br0", "-j", "RETURN"],
        *(["-t", "nat", "-A", "DOCKER", "!", "-i", "br0", "-p", "tcp", "--dport", str(outside), "-j", "DNAT",
           "--to-destination", f"{PRIVATE_IP}:{inside}"] for outside, inside in published),
        ["-N", "DOCKER"],
        ["-P", "FORWARD", "DROP"],
        ["-A", "FORWARD", "-o", "br0", "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"],
        ["-A", "FORWARD", "-o", "br0", "-j", "DOCKER"],
        ["-A", "FORWARD", "-i", "br0", "!", "-o", "br0", "-j", "ACCEPT"],
        ["-A", "FORWARD", "-i", "br0", "-o", "br0", "-j", "ACCEPT"],
        *(["-A", "DOCKER", "-d", PRIVATE_IP, "!", "-i", "br0", "-o", "br0", "-p", "tcp", "--dport", str(inside),
           "-j", "ACCEPT"] for _outside, inside in published),
    ]  # fmt: skip
    for r in rules:
        bench.run(["iptables", "-w", *r], ns=host)
    bench.start_servers(srv, "b")
    return Target(cli, PUBLIC_IP, PUBLISHED_HTTP, IPERF_PORT)


def ovs_ctnat(bench: Bench) -> Target:
    """(c) One userspace OVS mapping the VIP by conntrack DNAT flows, as an OVN load balancer does."""
    cli = bench.client_ns("c-cli")
    host = bench.ns("c-host")
    srv = bench.ns("c-srv")
    bench.veth(cli, "eth0", host, "pcli", mac_a=CLI_MAC)
    bench.veth(srv, "eth0", host, "psrv", mac_a=SRV_MAC)
    # Static next hops: the benchmark is about the TCP path, not ARP.
    bench.addr(cli, "eth0", f"{CLIENT_IP}/24")
    bench.run(["ip", "-n", cli, "neigh", "replace", OUTSIDE_GW, "lladdr", GW_MAC, "dev", "eth0", "nud", "permanent"])
    bench.run(["ip", "-n", cli, "route", "add", "203.0.113.0/24", "via", OUTSIDE_GW])
    bench.addr(srv, "eth0", f"{PRIVATE_IP}/24")
    bench.run(["ip", "-n", srv, "neigh", "replace", PRIVATE_GW, "lladdr", GW_MAC, "dev", "eth0", "nud", "permanent"])
    bench.run(["ip", "-n", srv, "route", "add", "default", "via", PRIVATE_GW])
    bench.start_servers(srv, "c")

    rundir = bench.tmp / "ovs"
    rundir.mkdir()
    env = dict(os.environ, OVS_RUNDIR=str(rundir), OVS_DBDIR=str(rundir), OVS_LOGDIR=str(rundir))
    db = rundir / "conf.db"
    sock = f"unix:{rundir}/db.sock"
    schema = "/usr/share/openvswitch/vswitch.ovsschema"
    bench.run(["ovsdb-tool", "create", str(db), schema], env=env)
    bench.spawn(
        "c-ovsdb",
        [
            "ovsdb-server",
            str(db),
            f"--remote=p{sock}",
            f"--pidfile={rundir}/ovsdb-server.pid",
            f"--unixctl={rundir}/ovsdb-server.ctl",
            f"--log-file={rundir}/ovsdb-server.log",
        ],
        ns=host,
        env=env,
    )
    vsctl = ["ovs-vsctl", f"--db={sock}", "--timeout=10"]
    _retry(lambda: bench.run([*vsctl, "--no-wait", "init"], ns=host, env=env, check=True))
    # Read once at start: must be set before ovs-vswitchd runs.
    bench.run([*vsctl, "--no-wait", "set", "Open_vSwitch", ".", "other_config:userspace-tso-enable=true"], ns=host, env=env)
    bench.spawn(
        "c-vswitchd",
        [
            "ovs-vswitchd",
            sock,
            f"--pidfile={rundir}/ovs-vswitchd.pid",
            f"--unixctl={rundir}/ovs-vswitchd.ctl",
            f"--log-file={rundir}/ovs-vswitchd.log",
        ],
        ns=host,
        env=env,
    )
    bench.run(
        [
            *vsctl,
            "add-br",
            "br0",
            "--",
            "set",
            "Bridge",
            "br0",
            "datapath_type=netdev",
            "fail_mode=secure",
            "protocols=OpenFlow13",
            "--",
            "add-port",
            "br0",
            "pcli",
            "--",
            "set",
            "Interface",
            "pcli",
            "ofport_request=1",
            "--",
            "add-port",
            "br0",
            "psrv",
            "--",
            "set",
            "Interface",
            "psrv",
            "ofport_request=2",
        ],
        ns=host,
        env=env,
    )
    # The OVN load-balancer shape: every IP packet through conntrack (zone 1) with nat; a new
    # connection to VIP:port is committed with nat(dst=backend) (OVN's ct_lb); established
    # traffic is un-/re-NATed by ct(nat) and routed by destination.
    flows = [
        "table=0,priority=100,ip,in_port=1,actions=ct(zone=1,nat,table=1)",
        "table=0,priority=100,ip,in_port=2,actions=ct(zone=1,nat,table=2)",
        "table=0,priority=0,actions=drop",
        *(
            f"table=1,priority=100,ct_state=+new+trk,tcp,nw_dst={PUBLIC_IP},tp_dst={port},"
            f"actions=ct(commit,zone=1,nat(dst={PRIVATE_IP}:{port}),table=3)"
            for port in (HTTP_PORT, IPERF_PORT)
        ),
        "table=1,priority=90,ct_state=+est+trk,ip,actions=goto_table:3",
        "table=1,priority=90,ct_state=+rel+trk,ip,actions=goto_table:3",
        "table=1,priority=0,actions=drop",
        "table=2,priority=90,ct_state=+est+trk,ip,actions=goto_table:3",
        "table=2,priority=90,ct_state=+rel+trk,ip,actions=goto_table:3",
        "table=2,priority=0,actions=drop",
        f"table=3,priority=100,ip,nw_dst={PRIVATE_IP},"
        f"actions=set_field:{GW_MAC}->eth_src,set_field:{SRV_MAC}->eth_dst,output:2",
        f"table=3,priority=100,ip,nw_dst={CLIENT_IP},"
        f"actions=set_field:{GW_MAC}->eth_src,set_field:{CLI_MAC}->eth_dst,output:1",
        "table=3,priority=0,actions=drop",
    ]
    (rundir / "flows.txt").write_text("\n".join(flows) + "\n")
    bench.run(["ovs-ofctl", "-O", "OpenFlow13", "add-flows", "br0", str(rundir / "flows.txt")], ns=host, env=env)
    tso = bench.run(
        [*vsctl, "get", "Open_vSwitch", ".", "other_config:userspace-tso-enable"], ns=host, env=env, check=False
    ).stdout.strip()
    return Target(
        cli,
        PUBLIC_IP,
        HTTP_PORT,
        IPERF_PORT,
        extra=lambda: {"userspace_tso": tso.strip('"') == "true", "socket_drops": _packet_socket_drops(bench, host)},
    )


def _packet_socket_drops(bench: Bench, ns: str) -> int:
    """Drops on OVS's packet sockets (skmem d<N>), which OVS's own counters never show."""
    out = bench.run(["ss", "-0", "-m", "-a"], ns=ns, check=False).stdout
    return sum(int(m) for m in re.findall(r"\bd(\d+)\)", out))


def _retry(fn: Callable[[], object], tries: int = 50, delay: float = 0.1) -> None:
    """Call ``fn`` until it stops raising BenchError: a daemon just spawned takes a moment to listen."""
    for i in range(tries):
        try:
            fn()
            return
        except BenchError:
            if i == tries - 1:
                raise
            time.sleep(delay)


REFERENCE: dict[str, Callable[[Bench], Target]] = {"direct": direct, "bridge_dnat": bridge_dnat, "ovs_ctnat": ovs_ctnat}
