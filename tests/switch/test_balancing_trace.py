"""Tier 2: balanced and filtered mappings compiled by the real controller into a dummy-datapath OVS.

Packets are injected with ``netdev-dummy/receive`` (so the switch really runs conntrack: its zone-2
entries and their labels are read back with ``dpctl/dump-conntrack``) and checked with ``ofproto/trace``
(``--ct-next`` resumes the recirculated packet: a SYN as a new connection, a later segment as an
established one carrying the label conntrack really holds for its 5-tuple)."""

from __future__ import annotations

import re
import time
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from portmesh.controller.pipeline import Table
from portmesh.lab.dummy_ovs import DummyOVS
from portmesh.model.config import DEFAULT_CONFIG as CFG
from portmesh.model.entities import DesiredState, Host, MappingKey, Proto
from portmesh.model.validation import new_container, new_mapping, with_backend
from tests.switch.conftest import ControllerThread, MemoryState
from tests.switch.test_pipeline_trace import of_outputs, setup

VIP = IPv4Address("203.0.113.20")
KEY = MappingKey(VIP, Proto.TCP, 80)
FW = MappingKey(VIP, Proto.TCP, 22)


def build_state() -> DesiredState:
    state = DesiredState(hosts={"h1": Host("h1", datapath_id=1)})
    for name in ("web-a", "web-b", "web-c", "web-d", "ssh"):
        c = new_container(state, CFG, name=name, host="h1", ips=[VIP])
        state = replace(state, containers={**state.containers, name: c})
    lb = new_mapping(state, KEY, ["web-a", "web-b", "web-c"], weights={"web-c": 2})
    fw = new_mapping(state, FW, "ssh", allow=(IPv4Network("198.51.100.0/25"),),
                     deny=(IPv4Network("198.51.100.7/32"),))
    return replace(state, mappings={**state.mappings, lb.key: lb, fw.key: fw})


ACK = "0x10"


def packet(src: str, sport: int, dport: int = 80, flags: str = "0x02") -> str:
    return (f"in_port=LOCAL,dl_src={CFG.gateway_mac},dl_dst={CFG.virtual_mac},tcp,nw_src={src},"
            f"nw_dst={VIP},tp_src={sport},tp_dst={dport},tcp_flags={flags}")


def send(ovs: DummyOVS, src: str, sport: int, dport: int = 80) -> None:
    """One SYN received on the host's LOCAL port (br0's own dummy netdev): the switch really runs it,
    learn actions and flow statistics included."""
    spec = packet(src, sport, dport).replace("in_port=LOCAL,", "").replace("dl_", "eth_")
    dump = ovs.ofctl("compose-packet", spec)
    data = "".join("".join(line[10:59].replace("-", " ").split()) for line in dump.splitlines())
    ovs.appctl("netdev-dummy/receive", "br0", data)


def backend_of(ovs: DummyOVS, ports: dict[str, int], src: str, sport: int, dport: int = 80, flags: str = "0x02") -> str | None:
    """Where the switch sends a segment: a SYN (the default) is balanced afresh, a later segment (``flags``
    with ACK, 0x10) follows the backend conntrack remembers for its 5-tuple (none: a new connection)."""
    label = labels(ovs).get((src, sport, dport)) if flags != "0x02" else None
    spec = packet(src, sport, dport, flags) + (f",ct_label={label:#x}" if label else "")
    outs = of_outputs(ovs.appctl("ofproto/trace", "br0", spec, "--ct-next", "trk,est" if label else "trk,new"))
    by_port = {str(p): n for n, p in ports.items()}
    return by_port.get(outs[0]) if len(outs) == 1 else None


def labels(ovs: DummyOVS) -> dict[tuple[str, int, int], int]:
    """Conntrack zone 2 (balanced mappings): (client IP, client port, mapped port) -> ct_label."""
    out = {}
    for line in ovs.appctl("dpctl/dump-conntrack", "zone=2").splitlines():
        m = re.search(r"orig=\(src=([\d.]+),dst=[\d.]+,sport=(\d+),dport=(\d+)\).*labels=(0x[0-9a-f]+)", line)
        if m:
            out[(m[1], int(m[2]), int(m[3]))] = int(m[4], 16)
    return out


def wait_labels(ovs: DummyOVS, n: int, timeout: float = 5.0) -> dict[tuple[str, int, int], int]:
    deadline = time.monotonic() + timeout
    while True:
        got = labels(ovs)
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def affinity(ovs: DummyOVS) -> list[str]:
    return [f for f in ovs.dump_flows("br0") if f", table={Table.AFFINITY.number}, " in f]


def test_balancing_pins_connections_by_conntrack(dummy_ovs: DummyOVS, tmp_path: Path) -> None:
    state = build_state()
    source, ctl, ports = setup(dummy_ovs, tmp_path, state)
    try:
        source.wait_realized("h1")
        chosen = {}
        for sport in range(41000, 41120, 2):
            chosen[sport] = backend_of(dummy_ovs, ports, "198.51.100.50", sport)
        assert set(chosen.values()) <= {"web-a", "web-b", "web-c"} and len(set(chosen.values())) == 3, chosen
        for sport in chosen:
            send(dummy_ovs, "198.51.100.50", sport)
        pins = wait_labels(dummy_ovs, 60)
        assert len(pins) == 60, pins
        mac_of = {n: int(c.mac.replace(":", ""), 16) for n, c in state.containers.items()}
        assert {s: pins[("198.51.100.50", s, 80)] for s in chosen} == {s: mac_of[n] for s, n in chosen.items()}
        assert {backend_of(dummy_ovs, ports, "198.51.100.50", s, flags=ACK) for s in chosen} == set(chosen.values())
        # Add web-d with a big weight: the pinned connections stay where they are.
        lb = with_backend(state, state.mappings[KEY], "web-d", 10)
        state2 = replace(state, mappings={**state.mappings, KEY: lb})
        gen = source.publish(state2)
        source.wait_realized("h1", gen)
        after = {sport: backend_of(dummy_ovs, ports, "198.51.100.50", sport, flags=ACK) for sport in chosen}
        assert after == chosen
        fresh = {backend_of(dummy_ovs, ports, "198.51.100.51", s) for s in range(42000, 42080, 2)}
        assert "web-d" in fresh  # positive control: new connections do reach the new backend
        # web-a goes down: no new connection reaches it, its own are chosen afresh, the others stay.
        lb3 = replace(lb, down=frozenset({"web-a"}))
        state3 = replace(state2, mappings={**state2.mappings, KEY: lb3})
        gen = source.publish(state3)
        source.wait_realized("h1", gen)
        fresh = {backend_of(dummy_ovs, ports, "198.51.100.52", s) for s in range(43000, 43200, 2)}
        assert "web-a" not in fresh and fresh <= {"web-b", "web-c", "web-d"}, fresh
        now = {s: backend_of(dummy_ovs, ports, "198.51.100.50", s, flags=ACK) for s in chosen}
        assert {s: b for s, b in now.items() if chosen[s] != "web-a"} == {s: b for s, b in chosen.items() if b != "web-a"}
        assert "web-a" in chosen.values() and all(now[s] in {"web-b", "web-c", "web-d"} for s in chosen)
        # A SYN is balanced afresh even on a pinned 5-tuple (a client port reused after a refusal).
        assert all(backend_of(dummy_ovs, ports, "198.51.100.50", s) != "web-a" for s in chosen)
    finally:
        ctl.stop()
    # A restarted controller: AFFINITY is the controller's own now, read back and found equal.
    (tmp_path / "ctl.sock").unlink()
    source2 = MemoryState(state3)
    ctl2 = ControllerThread(source2, tmp_path / "ctl.sock").start()
    try:
        source2.wait_realized("h1", 0, timeout=20)
        assert ctl2.controller is not None
        assert ctl2.controller.flow_mods == 0
        assert len(labels(dummy_ovs)) == 60
        assert affinity(dummy_ovs)  # positive control for the removal below
        # Removing the mapping removes its AFFINITY flows (its owner's cookies).
        gone = replace(state3, mappings={k: m for k, m in state3.mappings.items() if k != KEY})
        gen = source2.publish(gone)
        source2.wait_realized("h1", gen)
        assert affinity(dummy_ovs) == []
        assert not any("tp_dst=80 " in f or "tp_dst=80," in f for f in dummy_ovs.dump_flows("br0"))
    finally:
        ctl2.stop()


def test_udp_pins_and_buckets(dummy_ovs: DummyOVS, tmp_path: Path) -> None:
    """UDP: no flags; the first datagram takes its bucket, later ones follow the label."""
    state = build_state()
    dns = new_mapping(state, MappingKey(VIP, Proto.UDP, 53), ["web-a", "web-b"])
    state = replace(state, mappings={**state.mappings, dns.key: dns})
    source, ctl, ports = setup(dummy_ovs, tmp_path, state)
    by_port = {str(p): n for n, p in ports.items()}
    udp = (f"in_port=LOCAL,dl_src={CFG.gateway_mac},dl_dst={CFG.virtual_mac},udp,nw_src=198.51.100.70,"
           f"nw_dst={VIP},nw_ttl=64,udp_dst=53")
    try:
        source.wait_realized("h1")
        first = {s: by_port.get(of_outputs(dummy_ovs.appctl("ofproto/trace", "br0", f"{udp},udp_src={s}", "--ct-next",
                                                             "trk,new"))[0]) for s in range(50000, 50064, 2)}
        assert set(first.values()) == {"web-a", "web-b"}, first
        mac_b = state.containers["web-b"].mac.replace(":", "")
        for s in first:  # whatever its bucket says, a datagram labelled web-b goes to web-b
            out = dummy_ovs.appctl("ofproto/trace", "br0", f"{udp},udp_src={s},ct_label=0x{mac_b}", "--ct-next", "trk,est")
            assert of_outputs(out) == [str(ports["web-b"])], out
    finally:
        ctl.stop()


def test_counters_allowed_and_denied(dummy_ovs: DummyOVS, tmp_path: Path) -> None:
    """The master's counter round: POLICY and BALANCE flow stats summed per mapping, only changes written."""
    from portmesh.controller.counters import CounterReporter
    from portmesh.model.entities import MappingCounters

    state = build_state()
    source, ctl, _ports = setup(dummy_ovs, tmp_path, state)
    written: list[dict[MappingKey, MappingCounters]] = []

    class Sink:
        def report_counters(self, counters: dict[MappingKey, MappingCounters]) -> None:
            written.append(counters)

    try:
        source.wait_realized("h1")
        for sport in range(45000, 45003):  # 3 allowed (inside the allow list)
            send(dummy_ovs, "198.51.100.9", sport, 22)
        for sport in range(45000, 45002):  # 2 denied: one by the deny list, one outside the allow list
            send(dummy_ovs, "198.51.100.7" if sport % 2 else "198.51.100.200", sport, 22)
        for sport in range(46000, 46004):  # 4 balanced
            send(dummy_ovs, "198.51.100.50", sport)
        send(dummy_ovs, "198.51.100.50", 46000)  # the same connection again: one more packet counted
        reporter = CounterReporter(ctl.controller)
        # The switch folds datapath statistics into its flows' counters every ~0.5 s: poll for them.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ctl.call(reporter.once(Sink())).result(10)
            fw, lb = reporter.reported.get(FW), reporter.reported.get(KEY)
            if fw and lb and fw.allowed_packets + fw.denied_packets >= 5 and lb.allowed_packets >= 5:
                break
            time.sleep(0.2)
        assert fw is not None and lb is not None
        assert (fw.allowed_packets, fw.denied_packets) == (3, 2), fw
        assert fw.allowed_bytes > 0 and fw.denied_bytes > 0
        assert (lb.allowed_packets, lb.denied_packets) == (5, 0), lb
        n = len(written)
        assert written and all(set(w) <= {FW, KEY} for w in written)
        assert ctl.call(reporter.once(Sink())).result(10) == {}  # nothing changed: nothing written
        assert len(written) == n
    finally:
        ctl.stop()


def test_no_serving_backend_refuses_like_unmapped(dummy_ovs: DummyOVS, tmp_path: Path) -> None:
    state = build_state()
    source, ctl, ports = setup(dummy_ovs, tmp_path, state)
    try:
        source.wait_realized("h1")
        assert backend_of(dummy_ovs, ports, "198.51.100.60", 44000) in {"web-a", "web-b", "web-c"}
        lb = replace(state.mappings[KEY], down=frozenset({"web-a", "web-b", "web-c"}))
        gen = source.publish(replace(state, mappings={**state.mappings, KEY: lb}))
        source.wait_realized("h1", gen)
        out = dummy_ovs.trace("br0", packet("198.51.100.60", 44001))
        assert of_outputs(out) == [] and "CONTROLLER" in out.upper(), out  # the public IP's reject flow
    finally:
        ctl.stop()


def test_balanced_across_hosts_and_direct_server_return(tmp_path: Path) -> None:
    """Backends on three hosts: the gateway's switch picks a backend MAC and sends it into that host's
    tunnel; there it is delivered; each backend may answer from the mapped port (its allowance)."""
    import shutil

    import pytest

    from tests.switch.test_multihost_trace import IP10, TUNNEL_NO, Cloud, tcp_in
    from tests.switch.test_multihost_trace import build_state as three_hosts

    if shutil.which("ovs-vswitchd") is None:
        pytest.skip("ovs-vswitchd not installed")
    base = three_hosts()
    key = MappingKey(IP10, Proto.TCP, 8000)
    lb = new_mapping(base, key, ["a", "b", "c"])
    cloud = Cloud(tmp_path, replace(base, mappings={**base.mappings, key: lb}))
    try:
        for host in ("h1", "h2", "h3"):
            cloud.source.wait_realized(host)
        where = {"a": str(cloud.ports["a"]), "b": str(TUNNEL_NO["h2"]), "c": str(TUNNEL_NO["h3"])}
        seen = set()
        for sport in range(47000, 47030):
            out = of_outputs(cloud.trace("h1", tcp_in("LOCAL", CFG.virtual_mac, 8000).replace("40000", str(sport))))
            assert len(out) == 1 and out[0] in where.values(), out
            seen.add(out[0])
        assert seen == set(where.values()), seen  # all three hosts' backends get connections
        for name, host in (("b", "h2"), ("c", "h3")):
            mac = cloud.state.containers[name].mac
            assert of_outputs(cloud.trace(host, tcp_in(TUNNEL_NO["h1"], mac, 8000))) == [str(cloud.ports[name])]
            # Direct server return: the backend answers from 203.0.113.10:8000 straight to the client.
            c = cloud.state.containers[name]
            reply = (f"in_port={cloud.ports[name]},dl_src={c.mac},dl_dst={CFG.gateway_mac},tcp,nw_src={IP10},"
                     f"nw_dst=198.51.100.2,tp_src=8000,tp_dst=47000")
            assert of_outputs(cloud.trace(host, reply)) == [str(TUNNEL_NO["h1"])]
            other = reply.replace("tp_src=8000", "tp_src=8001")  # positive control: a port it does not own
            assert of_outputs(cloud.trace(host, other)) == []
    finally:
        cloud.stop()


def test_learn_cost_measurement(dummy_ovs: DummyOVS, tmp_path: Path) -> None:
    """Opt-in (PORTMESH_LEARN_BENCH=N): ovs-vswitchd CPU per new connection, N SYNs of distinct 5-tuples
    to a plain mapping (one megaflow serves them all) and to a balanced one (conntrack; megaflows per bucket)."""
    import os
    import re

    import pytest

    n = int(os.environ.get("PORTMESH_LEARN_BENCH", "0"))
    if n <= 0:
        pytest.skip("set PORTMESH_LEARN_BENCH=N to measure")
    state = build_state()
    plain = new_mapping(state, MappingKey(VIP, Proto.TCP, 8080), "web-d")
    state = replace(state, mappings={**state.mappings, plain.key: plain})
    source, ctl, _ports = setup(dummy_ovs, tmp_path, state)
    pid = dummy_ovs.procs[1].pid

    def cpu() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def frame(src: str, sport: int, dport: int) -> str:
        spec = packet(src, sport, dport).replace("in_port=LOCAL,", "").replace("dl_", "eth_")
        dump = dummy_ovs.ofctl("compose-packet", spec)
        return "".join("".join(line[10:59].replace("-", " ").split()) for line in dump.splitlines())

    try:
        source.wait_realized("h1")
        figures = {}
        for dport, name in ((8080, "plain"), (80, "balanced")):
            frames = [frame(f"198.51.100.{1 + i // 250 % 250}", 1024 + i % 60000, dport) for i in range(n)]
            dummy_ovs.appctl("dpif-netdev/pmd-stats-clear")
            before = cpu()
            for i in range(0, n, 20):
                dummy_ovs.appctl("netdev-dummy/receive", "br0", *frames[i:i + 20])
            time.sleep(3)  # let revalidators and learned-flow bookkeeping finish
            used = cpu() - before
            stats = dummy_ovs.appctl("dpif-netdev/pmd-stats-show")
            got = int(re.findall(r"packets received: (\d+)", stats)[0])
            upcalls = int(re.findall(r"miss with success upcall: (\d+)", stats)[0])
            figures[name] = used / got * 1e6
            print(f"{name}: {got} new connections, {upcalls} upcalls, ovs-vswitchd CPU {used:.2f} s "
                  f"= {figures[name]:.0f} us per connection")
        print(f"zone 2 entries: {len(labels(dummy_ovs))}; flows on the switch: {len(dummy_ovs.dump_flows('br0'))}")
        assert figures["balanced"] > 0
    finally:
        ctl.stop()
