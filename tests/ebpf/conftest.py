"""A real-kernel lab for the eBPF datapath program, without OVS and without the agent.

``Dplab`` builds, in namespaces named ``pe<pid>-...``: a host (``up0`` 198.51.100.1/24,
ip_forward on), two containers sharing 203.0.113.10 (each ``eth0`` with its MAC, the IP /32,
169.254.1.1 as gateway, its port block as ``ip_local_port_range`` and the agent's same-IP
policy routing), and ``inet`` (198.51.100.2/24, 203.0.113.0/24 via the host). The object is
built by ``build.object_path``, loaded and attached in the host namespace by ``nstool``
(``portmesh.agent.ebpf.loader``), and the test fills the pinned maps itself, as the agent would.
Everything made here goes in ``close``: processes by PID, namespaces, the bpffs mount.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from portmesh.agent.ebpf import build, layout, loader

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tests" / "lab" / "tools"
PY = sys.executable

PUBLIC = IPv4Address("203.0.113.10")
GATEWAY_IP = IPv4Address("169.254.1.1")
GATEWAY_MAC = "0a:58:a9:fe:01:01"
VIRTUAL_MAC = "0a:58:cb:00:71:ff"
HOST_UP = "198.51.100.1"
INET = "198.51.100.2"


class Sharer:
    """A container sharing PUBLIC: its MAC, port block and mapped TCP/UDP port."""

    def __init__(self, name: str, mac: str, block: int, block_size: int, port: int) -> None:
        self.name, self.mac, self.block, self.block_size, self.port = name, mac, block, block_size, port
        self.ns = ""
        self.hostif = f"v{name}"
        self.ifindex = 0


def sh(*args: str, check: bool = True, timeout: float = 30) -> str:
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {out.returncode}: {out.stderr.strip()}")
    return out.stdout


class Dplab:
    """The namespaces, processes and pinned maps of one test's datapath lab."""

    def __init__(self, prefix: str, obj: Path, tunnel: bool = False) -> None:
        self.prefix = prefix
        self.obj = obj
        self.host = f"{prefix}h"
        self.inet = f"{prefix}i"
        self.pin = Path(f"/run/portmesh-test/{prefix}")
        self.procs: list[subprocess.Popen[str]] = []
        self.lines: dict[int, queue.Queue[str]] = {}
        self.readers: dict[int, threading.Thread] = {}
        self.namespaces: list[str] = []
        self.mounts: list[Path] = []
        self.a = Sharer("a", "0a:00:00:00:00:0a", 32768, 1024, 8081)
        self.b = Sharer("b", "0a:00:00:00:00:0b", 33792, 1024, 8082)

    # -- building ------------------------------------------------------------------------
    def netns(self, name: str) -> str:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        self.x(name, "ip", "link", "set", "lo", "up")
        return name

    def x(self, ns: str, *args: str, check: bool = True, timeout: float = 30) -> str:
        return sh("ip", "netns", "exec", ns, *args, check=check, timeout=timeout)

    def build(self) -> None:
        self.netns(self.host)
        self.netns(self.inet)
        self.x(self.host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh("ip", "-n", self.host, "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", self.inet)
        self.x(self.host, "ip", "addr", "add", f"{HOST_UP}/24", "dev", "up0")
        self.x(self.host, "ip", "link", "set", "up0", "up")
        self.x(self.inet, "ip", "addr", "add", f"{INET}/24", "dev", "eth0")
        self.x(self.inet, "ip", "link", "set", "eth0", "up")
        self.x(self.inet, "ip", "route", "add", "203.0.113.0/24", "via", HOST_UP)
        for c in (self.a, self.b):
            self.container(c)
        self.load()
        self.fill()
        self.attach()

    def container(self, c: Sharer, host: str = "", mtu: int = 1500) -> None:
        """The agent's plumbing, by hand: veth, MAC, /32, gateway routes, block, same-IP rule."""
        host = host or self.host
        c.ns = self.netns(f"{self.prefix}{c.name}")
        # No IPv6 chatter (router solicitations, MLD): the NOT_IP counter is asserted exactly.
        self.x(c.ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        sh("ip", "-n", host, "link", "add", c.hostif, "type", "veth", "peer", "name", "eth0", "netns", c.ns)
        self.x(host, "ip", "link", "set", c.hostif, "up")
        c.ifindex = self.ifindex(host, c.hostif)
        for cmd in (
            ["ip", "link", "set", "eth0", "address", c.mac, "mtu", str(mtu)],
            ["ip", "link", "set", "eth0", "up"],
            ["ip", "addr", "add", f"{PUBLIC}/32", "dev", "eth0"],
            ["ip", "route", "add", str(GATEWAY_IP), "dev", "eth0", "scope", "link"],
            ["ip", "route", "add", "default", "via", str(GATEWAY_IP), "dev", "eth0", "onlink"],
            # same-IP: the public IP is local only for packets from eth0 (plumbing._move_local_routes)
            ["ip", "route", "add", "local", str(PUBLIC), "dev", "eth0", "table", "100"],
            ["ip", "route", "del", "local", str(PUBLIC), "dev", "eth0", "table", "local"],
            ["ip", "rule", "add", "pref", "1", "iif", "eth0", "lookup", "100"],
            ["sysctl", "-qw", f"net.ipv4.ip_local_port_range={c.block} {c.block + c.block_size - 1}"],
        ):
            self.x(c.ns, *cmd)

    def ifindex(self, ns: str, ifname: str) -> int:
        return int(json.loads(sh("ip", "-n", ns, "-j", "link", "show", ifname))[0]["ifindex"])

    def load(self) -> None:
        self.mount(self.pin)
        self.x(self.host, PY, "-m", "tests.ebpf.nstool", "load", str(self.obj), str(self.pin))

    def mount(self, pin: Path) -> None:
        pin.mkdir(parents=True, exist_ok=True)
        self.mounts.append(pin)
        loader.ensure_bpffs(pin)

    def attach(self, obj: Path | None = None, *extra: str) -> None:
        """Attach the programs in the host namespace (tc keeps them after nstool exits).

        ``extra``: more ``PROGRAM=IF,...`` for nstool (tunnel devices)."""
        ports = ",".join(c.hostif for c in (self.a, self.b))
        self.x(self.host, PY, "-m", "tests.ebpf.nstool", "attach", str(obj or self.obj), str(self.pin),
               f"pm_from_container={ports}", "pm_from_uplink=up0", *extra)

    def map(self, name: str, pin: Path | None = None) -> loader.BpfMap:
        return loader.open_map(pin or self.pin, name)

    def fill(self) -> None:
        """What the agent would write for this (gateway) host: config, networks, its two sharers."""
        self.fill_host(self.pin, gateway_tunnel=0)
        for c in (self.a, self.b):
            self.add_port(self.pin, c)
            self.add_dest(self.pin, c, self.local(c))

    @staticmethod
    def local(c: Sharer) -> layout.Dest:
        return layout.Dest(mac=layout.mac_bytes(c.mac), flags=layout.DEST_LOCAL, ifindex=c.ifindex, owner=c.ifindex)

    def fill_host(self, pin: Path, gateway_tunnel: int) -> None:
        """config (a gateway when gateway_tunnel is 0), the public IP, the networks."""
        cfg = layout.Config(gateway_mac=layout.mac_bytes(GATEWAY_MAC), virtual_mac=layout.mac_bytes(VIRTUAL_MAC),
                            gateway_ip=layout.be32(GATEWAY_IP), gateway_tunnel=gateway_tunnel,
                            flags=0 if gateway_tunnel else layout.CFG_GATEWAY)
        pub = layout.be32(PUBLIC)
        with self.map("config", pin) as m:
            m.update(bytes(ctypes.c_uint32(0)), bytes(cfg))
        with self.map("public_ips", pin) as m:
            m.update(bytes(ctypes.c_uint32(pub)), bytes(ctypes.c_uint32(1)))
        with self.map("networks", pin) as m:
            for net, plen, kind in (("203.0.113.0", 24, layout.NET_POOL), ("198.18.0.0", 15, layout.NET_PROTECTED),
                                    ("169.254.0.0", 16, layout.NET_LINK_LOCAL)):
                net_key = layout.NetKey(prefixlen=plen, ip=layout.be32(IPv4Address(net)))
                m.update(bytes(net_key), bytes(ctypes.c_uint32(kind)))

    def add_port(self, pin: Path, c: Sharer) -> None:
        """A local container's port: its MAC and the IP it may send from."""
        port = layout.Port(mac=layout.mac_bytes(c.mac), owner=c.ifindex)
        with self.map("ports", pin) as m:
            m.update(bytes(ctypes.c_uint32(c.ifindex)), bytes(port))
        with self.map("owned_ips", pin) as m:
            m.update(bytes(layout.OwnedIp(ifindex=c.ifindex, ip=layout.be32(PUBLIC))), bytes(ctypes.c_uint8(1)))

    def add_dest(self, pin: Path, c: Sharer, dest: layout.Dest) -> None:
        """Where c's MAC, block and mapped port (TCP and UDP) lead on this host; counters at zero."""
        pub = layout.be32(PUBLIC)
        with self.map("macs", pin) as m:
            m.update(bytes(layout.MacKey(mac=layout.mac_bytes(c.mac))), bytes(dest))
        with self.map("blocks", pin) as m:
            plen = 32 + 16 - (c.block_size.bit_length() - 1)
            m.update(bytes(layout.BlockKey(prefixlen=plen, ip=pub, port=layout.be16(c.block))), bytes(dest))
        for proto in (layout.IPPROTO_TCP, layout.IPPROTO_UDP):
            key = layout.MappingKey(ip=pub, port=layout.be16(c.port), proto=proto)
            with self.map("mappings", pin) as m:
                m.update(bytes(key), bytes(dest))
            with self.map("mapping_stats", pin) as m:
                m.update(bytes(key), bytes(layout.Counter()))

    # -- reading counters ----------------------------------------------------------------
    def drops(self, pin: Path | None = None) -> dict[layout.DropReason, int]:
        with self.map("drops", pin) as m:
            out = {}
            for reason in layout.DropReason:
                slots = m.lookup_percpu(bytes(ctypes.c_uint32(reason))) or []
                out[reason] = sum(layout.Counter.from_buffer_copy(s).packets for s in slots)
            return out

    def mapping_packets(self, port: int, proto: int) -> int:
        key = layout.MappingKey(ip=layout.be32(PUBLIC), port=layout.be16(port), proto=proto)
        with self.map("mapping_stats") as m:
            slots = m.lookup_percpu(bytes(key)) or []
        return sum(layout.Counter.from_buffer_copy(s).packets for s in slots)

    # -- processes -----------------------------------------------------------------------
    def start(self, ns: str, *args: str, ready: str, timeout: float = 10) -> subprocess.Popen[str]:
        """Start a long-running process in ``ns``; return once it printed a line starting ``ready``."""
        p = subprocess.Popen(["ip", "netns", "exec", ns, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=ROOT)
        self.procs.append(p)
        assert p.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        self.lines[p.pid] = lines
        # A thread reads the lines: select() on the pipe misses lines already in Python's buffer.
        self.readers[p.pid] = threading.Thread(target=self._read, args=(p, lines), daemon=True)
        self.readers[p.pid].start()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                got = lines.get(timeout=left)
            except queue.Empty:
                break
            if got.startswith(ready):
                return p
        raise RuntimeError(f"{args} did not get ready in {timeout} s (exit status {p.poll()})")

    @staticmethod
    def _read(p: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
        for line in p.stdout or ():
            lines.put(line)

    def rest(self, p: subprocess.Popen[str], timeout: float) -> str:
        """What ``p`` printed after its ready line, once it exited (bounded)."""
        p.wait(timeout)
        self.readers[p.pid].join(timeout)
        out = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self.lines[p.pid].get_nowait())
        return "".join(out)

    def whoami(self, ns: str, name: str, tcp: list[int], udp: list[int]) -> None:
        args = [PY, "-m", "portmesh.lab.whoami", "--name", name]
        for port in tcp:
            args += ["--tcp", str(port)]
        for port in udp:
            args += ["--udp", str(port)]
        self.start(ns, *args, ready="whoami")

    def tool(self, ns: str, script: str, *args: str, timeout: float = 30) -> dict[str, object]:
        """Run a bounded tests/lab/tools script in ``ns``; its JSON answer."""
        out = self.x(ns, PY, str(TOOLS / script), *args, timeout=timeout)
        result: dict[str, object] = json.loads(out)
        return result

    def stop(self, p: subprocess.Popen[str]) -> None:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def close(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                self.stop(p)
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        for pin in self.mounts:
            sh("umount", str(pin), check=False)
            with contextlib.suppress(OSError):
                pin.rmdir()


def csum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of data: 0 over a correct header with its checksum."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def mac_raw(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def ipv4_frame(dst_mac: str, src_mac: str, src: str, dst: str, proto: int, l4: bytes) -> str:
    """An Ethernet/IPv4 frame (hex, for clients.py raw-send) with a correct IP checksum."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return (mac_raw(dst_mac) + mac_raw(src_mac) + b"\x08\x00" + ip + l4).hex()


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the eBPF lab needs root")


@pytest.fixture(scope="session")
def datapath_object(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _needs_root()
    return build.object_path(tmp_path_factory.mktemp("ebpf"))


@pytest.fixture(scope="module")
def dplab(datapath_object: Path) -> Iterator[Dplab]:
    lab = Dplab(f"pe{os.getpid() % 10000}", datapath_object)
    try:
        lab.build()
        lab.whoami(lab.a.ns, "a", [lab.a.port], [lab.a.port])
        lab.whoami(lab.b.ns, "b", [lab.b.port], [lab.b.port])
        lab.whoami(lab.inet, "inet", [9000], [9000])
        yield lab
    finally:
        lab.close()
