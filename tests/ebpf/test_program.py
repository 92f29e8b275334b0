"""The eBPF datapath program on real packets (real kernel, no OVS, no agent).

Two containers share 203.0.113.10 behind one host (conftest.Dplab); inet reaches them through
the host's uplink. Every assertion is on what arrives where: the whoami servers report the peer
address they saw, sniffers in inet report what got out, and the program's own counters must
agree. Each negative assertion has a positive control through the same path.
"""

from __future__ import annotations

import json
import struct

from portmesh.agent.ebpf import layout

from .conftest import GATEWAY_MAC, INET, PUBLIC, TOOLS, VIRTUAL_MAC, Dplab, Sharer, ipv4_frame

TCP, UDP = layout.IPPROTO_TCP, layout.IPPROTO_UDP
D = layout.DropReason


def replies(out: dict[str, object]) -> list[dict[str, str]]:
    got = out["replies"]
    assert isinstance(got, list)
    return got


def one_reply(lab: Dplab, ns: str, proto: str, host: str, port: int) -> dict[str, str]:
    out = lab.tool(ns, "clients.py", proto, "--host", host, "--port", str(port))
    assert out["ok"] == 1, out
    return replies(out)[0]


def in_block(c: Sharer, port: int) -> bool:
    return c.block <= port < c.block + c.block_size


def test_inbound_reaches_each_sharer_with_the_clients_address(dplab: Dplab) -> None:
    for c in (dplab.a, dplab.b):
        for proto in ("tcp", "udp"):
            got = one_reply(dplab, dplab.inet, proto, str(PUBLIC), c.port)
            # The reply came back to inet (both ways) from the right container, which saw inet itself.
            assert got["name"] == c.name, (proto, got)
            assert got["client"].split(":")[0] == INET, got
            assert got["local"] == f"{PUBLIC}:{c.port}", got


def test_container_reaches_inet_from_its_block(dplab: Dplab) -> None:
    # The host has not resolved inet yet: the first packets take the fib's NO_NEIGH way (redirect_neigh).
    dplab.x(dplab.host, "ip", "neigh", "flush", "dev", "up0")
    for c in (dplab.a, dplab.b):
        for proto in ("tcp", "udp"):
            got = one_reply(dplab, c.ns, proto, INET, 9000)
            ip, port = got["client"].split(":")
            assert got["name"] == "inet"
            assert ip == str(PUBLIC) and in_block(c, int(port)), (c.name, proto, got)


def test_same_ip_sharers_reach_each_other_and_themselves(dplab: Dplab) -> None:
    for src in (dplab.a, dplab.b):
        for dst in (dplab.a, dplab.b):
            for proto in ("tcp", "udp"):
                got = one_reply(dplab, src.ns, proto, str(PUBLIC), dst.port)
                ip, port = got["client"].split(":")
                assert got["name"] == dst.name, (src.name, dst.name, proto, got)
                assert ip == str(PUBLIC) and in_block(src, int(port)), got


def test_arp_for_gateway_and_public_ip(dplab: Dplab) -> None:
    a = dplab.a
    # The gateway: the container's own neighbour table, filled by its kernel from the program's answer.
    dplab.x(a.ns, "ip", "neigh", "flush", "dev", "eth0")
    dplab.x(a.ns, "ping", "-c1", "-W2", "169.254.1.1")
    neigh = dplab.x(a.ns, "ip", "neigh", "show", "169.254.1.1", "dev", "eth0")
    assert GATEWAY_MAC in neigh.lower(), neigh
    # Pool addresses, treated as on-link for the moment: the shared public IP itself (its ping then
    # answered by the program) and one not in use: the virtual MAC, never a sharer's.
    dplab.x(a.ns, "ip", "route", "add", "203.0.113.0/24", "dev", "eth0", "table", "200")
    try:
        for pref, ip, answered in ((50, str(PUBLIC), True), (51, "203.0.113.77", False)):
            dplab.x(a.ns, "ip", "rule", "add", "pref", str(pref), "to", ip, "lookup", "200")
            ping = dplab.x(a.ns, "ping", "-c1", "-W1", ip, check=False)
            assert (" 1 received" in ping) == answered, ping
            neigh = dplab.x(a.ns, "ip", "neigh", "show", ip, "dev", "eth0")
            assert VIRTUAL_MAC in neigh.lower(), neigh
    finally:
        for pref in (50, 51):
            dplab.x(a.ns, "ip", "rule", "del", "pref", str(pref), check=False)
        dplab.x(a.ns, "ip", "route", "flush", "table", "200", check=False)


def udp_frame(src_mac: str, src_ip: str, sport: int, dst_ip: str, dport: int, payload: bytes) -> str:
    """A UDP datagram to the gateway MAC (UDP checksum 0: none)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return ipv4_frame(GATEWAY_MAC, src_mac, src_ip, dst_ip, UDP, udp)


def test_spoofed_sources_never_reach_inet_and_are_counted(dplab: Dplab) -> None:
    a, b = dplab.a, dplab.b
    port = 9100
    rec = dplab.start(dplab.inet, "python3", "-u", str(TOOLS / "probes.py"), "udp-record",
                      "--port", str(port), "--end", "END", "--seconds", "10", ready="READY")
    before = dplab.drops()
    frames = [
        udp_frame(a.mac, str(PUBLIC), a.block + 5, INET, port, b"legit"),
        udp_frame(a.mac, "203.0.113.99", a.block + 5, INET, port, b"spoof-ip"),
        udp_frame("0a:00:00:00:00:99", str(PUBLIC), a.block + 5, INET, port, b"spoof-mac"),
        udp_frame(b.mac, str(PUBLIC), b.block + 5, INET, port, b"spoof-mac-b"),
        udp_frame(a.mac, str(PUBLIC), b.block + 5, INET, port, b"spoof-port-block"),
        udp_frame(a.mac, str(PUBLIC), b.port, INET, port, b"spoof-port-mapping"),
        udp_frame(a.mac, str(PUBLIC), a.port, INET, port, b"legit-mapping"),
        udp_frame(a.mac, str(PUBLIC), a.block + 5, INET, port, b"END"),
    ]
    dplab.tool(a.ns, "clients.py", "raw-send", "--ifname", "eth0", *frames)
    out = dplab.rest(rec, timeout=15)
    heard = json.loads(out)["heard"]
    payloads = [h["payload"] for h in heard]
    assert payloads == ["legit", "legit-mapping", "END"], heard
    assert all(h["src"].startswith(f"{PUBLIC}:") for h in heard)
    after = dplab.drops()
    assert after[D.SPOOF_IP] - before[D.SPOOF_IP] == 1
    assert after[D.SPOOF_MAC] - before[D.SPOOF_MAC] == 2
    assert after[D.SPOOF_PORT] - before[D.SPOOF_PORT] == 2


def test_unmapped_ports_are_refused_promptly(dplab: Dplab) -> None:
    before = dplab.drops()
    for ns in (dplab.inet, dplab.a.ns):
        tcp = dplab.tool(ns, "clients.py", "tcp-refused", "--host", str(PUBLIC), "--port", "9")
        assert tcp["outcome"] == "refused" and float(str(tcp["seconds"])) < 1.0, (ns, tcp)
        udp = dplab.tool(ns, "clients.py", "udp-refused", "--host", str(PUBLIC), "--port", "9")
        assert udp["outcome"] == "refused" and float(str(udp["seconds"])) < 1.0, (ns, udp)
    # Positive control: a mapped port on the same address connects.
    ok = dplab.tool(dplab.inet, "clients.py", "tcp-refused", "--host", str(PUBLIC), "--port", str(dplab.a.port))
    assert ok["outcome"] == "connected", ok
    assert dplab.drops()[D.REFUSED] - before[D.REFUSED] == 4


def test_fence_protected_link_local_and_host(dplab: Dplab) -> None:
    before = dplab.drops()
    targets = ["198.18.0.1:80", "198.19.255.1:80", "169.254.1.1:80", "169.254.7.7:80", "198.51.100.1:22",
               f"{INET}:9000"]
    out = dplab.tool(dplab.a.ns, "probes.py", "tcp-probe", "--timeout", "1", *targets)
    results = out["results"]
    assert isinstance(results, list)
    outcome = {t: r["outcome"] for t, r in zip(targets, results, strict=True)}
    assert outcome[f"{INET}:9000"] == "connected", outcome  # positive control, same moment, same path
    for t in targets[:-1]:
        assert outcome[t] == "timeout", outcome
    # 5 SYNs at least (the kernel retries within the timeout; each is fenced).
    assert dplab.drops()[D.FENCE] - before[D.FENCE] >= 5


def test_ping_both_ways(dplab: Dplab) -> None:
    dplab.x(dplab.inet, "ping", "-c2", "-i0.2", "-W1", str(PUBLIC))
    for c in (dplab.a, dplab.b):
        dplab.x(c.ns, "ping", "-c2", "-i0.2", "-W1", INET)
        dplab.x(c.ns, "ping", "-c1", "-W1", "169.254.1.1")
        dplab.x(c.ns, "ping", "-c1", "-W1", str(PUBLIC))
    # Negative: a pool address not in use gets no answer (and the request is counted).
    before = dplab.drops()[D.ICMP]
    lost = dplab.x(dplab.inet, "ping", "-c1", "-W1", "203.0.113.77", check=False)
    assert " 0 received" in lost, lost
    assert dplab.drops()[D.ICMP] - before == 1


def test_mapping_stats_count_exactly_what_was_sent(dplab: Dplab) -> None:
    b = dplab.b
    before_udp, before_tcp = dplab.mapping_packets(b.port, UDP), dplab.mapping_packets(b.port, TCP)
    out = dplab.tool(dplab.inet, "clients.py", "udp", "--host", str(PUBLIC), "--port", str(b.port), "--count", "7")
    assert out["ok"] == 7, out
    assert dplab.mapping_packets(b.port, UDP) - before_udp == 7
    assert dplab.mapping_packets(b.port, TCP) == before_tcp  # control: the other protocol untouched


def test_reload_and_reattach_keep_traffic_flowing(dplab: Dplab) -> None:
    """An agent restart loads the object again over the pinned maps and replaces the filters:
    a ping every 5 ms from a container to inet (container and uplink programs, echo map) loses nothing."""
    a = dplab.a
    ping = dplab.start(a.ns, "ping", "-i", "0.005", "-c", "600", "-W", "1", INET, ready="PING")
    for _ in range(3):
        dplab.attach()
    ping.wait(30)
    out = dplab.rest(ping, timeout=5)
    assert ping.returncode == 0 and " 0% packet loss" in out, out
    assert "600 received" in out, out


def test_bulk_upload_from_a_container(dplab: Dplab) -> None:
    """TCP segmentation offload: the container's kernel hands the program 64 KB GSO packets, which
    must still leave by the host's routing (an MTU check on the IP length alone would drop them)."""
    server = dplab.start(dplab.inet, "stdbuf", "-oL", "iperf3", "-s", "-1", "-p", "5301", ready="Server listening")
    out = json.loads(dplab.x(dplab.a.ns, "iperf3", "-c", INET, "-p", "5301", "-t", "1", "-J", timeout=30))
    dplab.stop(server)
    received = out["end"]["sum_received"]["bytes"]
    assert received > 10_000_000, out["end"]["sum_received"]


def test_the_gateway_counts_a_hop(dplab: Dplab) -> None:
    """Out through the host's routing is one router hop, as with the OVS pipeline's LOCAL + routing."""
    before = dplab.drops()[D.TTL_EXCEEDED]
    dplab.x(dplab.a.ns, "ping", "-c1", "-W1", "-t2", INET)  # control: one hop to spare
    lost = dplab.x(dplab.a.ns, "ping", "-c1", "-W1", "-t1", INET, check=False)
    assert " 0 received" in lost and "Time to live exceeded" in lost, lost  # test_program_icmp_errors
    assert dplab.drops()[D.TTL_EXCEEDED] - before == 1
