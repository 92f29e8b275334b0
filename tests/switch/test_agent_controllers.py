"""Tier 2: the agent's br0 controller list against a real ovsdb-server and ovs-vswitchd (dummy datapath).

One Controller row per ``--controller`` target, written only when the list differs (an agent restart
writes nothing: replacing the rows would drop every connection), a changed list applied, and the
rows' ``max_backoff`` (written once the row is connected: bridge._ensure_controller_limits says why)
making a switch find a controller that was away for seconds within about one second of it listening
again (OVS's default backoff, up to 8 s, as the positive control).
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from portmesh.agent import bridge as bridge_module
from portmesh.agent.bridge import CONTROLLER_MAX_BACKOFF_MS, Bridge, BridgeSpec, parse_controller_targets
from portmesh.lab.dummy_ovs import DummyOVS

OFP13_HELLO = bytes([4, 0, 0, 8, 0, 0, 0, 1])  # version 1.3, HELLO, length 8, xid 1


class FakeController:
    """A TCP listener that speaks just enough OpenFlow for a switch's connection to count as up.

    It says HELLO (rconn: connected) and answers ECHO_REQUEST (so the switch's inactivity probe
    never drops it); it records when each switch connected. ``close`` drops everything, like a
    killed controller; ``listen`` again on the same port, like a restarted one.
    """

    def __init__(self) -> None:
        self.port = 0
        self.accepted: list[float] = []  # monotonic times
        self._sock: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def target(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def listen(self) -> FakeController:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(8)
        self.port = s.getsockname()[1]
        self._sock, self._stop = s, threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(s, self._stop), daemon=True)
        self._thread.start()
        return self

    def _serve(self, sock: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            ready, _, _ = select.select([sock, *self._conns], [], [], 0.05)
            for r in ready:
                if r is sock:
                    conn = sock.accept()[0]
                    self.accepted.append(time.monotonic())
                    conn.sendall(OFP13_HELLO)
                    self._conns.append(conn)
                    continue
                try:
                    data = r.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self._conns.remove(r)
                    r.close()
                    continue
                while len(data) >= 8:  # one message per header (switches send small ones here)
                    length = int.from_bytes(data[2:4], "big")
                    if data[1] == 2:  # ECHO_REQUEST -> ECHO_REPLY, same xid and body
                        r.sendall(bytes([data[0], 3]) + data[2:length])
                    data = data[length:]

    def wait_connected(self, count: int = 1, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.accepted) < count:
            assert time.monotonic() < deadline, f"no switch connected to {self.target}"
            time.sleep(0.02)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for c in self._conns:
            c.close()
        self._conns = []
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def until_written(ovs: DummyOVS, bridge: Bridge, spec: BridgeSpec, timeout: float = 10.0) -> None:
    """Agent passes until every row has max_backoff (written once the switch shows it connected)."""
    deadline = time.monotonic() + timeout
    while any(backoff != str(CONTROLLER_MAX_BACKOFF_MS) for _, backoff, _ in rows(ovs).values()):
        assert time.monotonic() < deadline, f"no pass wrote max_backoff: {rows(ovs)}"
        bridge.ensure(spec)
        time.sleep(0.05)


@pytest.fixture
def bridge(dummy_ovs: DummyOVS) -> Iterator[Bridge]:
    b = Bridge(f"unix:{dummy_ovs.db_sock}")
    b.start()
    try:
        yield b
    finally:
        b.close()


def rows(ovs: DummyOVS) -> dict[str, tuple[str, str, str]]:
    """target -> (uuid, max_backoff, controller_rate_limit) of br0's Controller rows."""
    mine = set(ovs.vsctl("get", "Bridge", "br0", "controller").strip("[]\n").replace(" ", "").split(","))
    out = ovs.vsctl("--format=csv", "--no-headings", "--columns=_uuid,target,max_backoff,controller_rate_limit",
                    "list", "Controller")
    got = {}
    for line in out.splitlines():
        uuid, target, backoff, rate = line.split(",")
        if uuid in mine:
            got[target.strip('"')] = (uuid, backoff, rate)
    return got


def test_parse_controller_targets() -> None:
    assert parse_controller_targets("tcp:198.18.0.1:6653, tcp:198.18.0.1:6654") == (
        "tcp:198.18.0.1:6653", "tcp:198.18.0.1:6654")
    for bad, why in (("", "empty"), ("tcp:198.18.0.1", "not tcp:IP:PORT"), ("unix:/x", "not tcp:IP:PORT"),
                     ("tcp:host:6653", "not an IP address"), ("tcp:198.18.0.1:0", "1-65535"),
                     ("tcp:198.18.0.1:6653,tcp:198.18.0.1:6653", "twice"), ("tcp:198.18.0.1:6653,", "not tcp")):
        with pytest.raises(ValueError, match=why):
            parse_controller_targets(bad)


def test_agent_flag_takes_a_list_and_names_itself_in_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from portmesh.agent.__main__ import parse_args

    base = ["--host", "h1", "--store", "unix:/x", "--ovsdb", "unix:/y", "--controller"]
    assert parse_args([*base, "tcp:198.18.0.1:6653,tcp:198.18.0.1:6654"]).controller == (
        "tcp:198.18.0.1:6653,tcp:198.18.0.1:6654")
    with pytest.raises(SystemExit) as exc:
        parse_args([*base, "tcp:198.18.0.1:6653,tcp:ctl:6654"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--controller" in err and "'tcp:ctl:6654'" in err and "not an IP address" in err, err


def test_one_row_per_target_idempotent_and_changed_list_applied(dummy_ovs: DummyOVS, bridge: Bridge) -> None:
    a, b, c = FakeController().listen(), FakeController().listen(), FakeController().listen()
    try:
        spec = BridgeSpec(1, "02:00:00:00:00:01", (a.target, b.target), datapath_type="dummy")
        assert bridge.ensure(spec)
        assert set(rows(dummy_ovs)) == {a.target, b.target}
        # The switch really connects to every target (not only rows written).
        a.wait_connected()
        b.wait_connected()
        until_written(dummy_ovs, bridge, spec)
        first = rows(dummy_ovs)
        assert all(backoff == str(CONTROLLER_MAX_BACKOFF_MS) and rate == "100" for _, backoff, rate in first.values())

        # An agent restart: a fresh OVSDB connection, the same list: nothing written, the rows are the same rows.
        again = Bridge(bridge.remote)
        again.start()
        try:
            assert not again.ensure(BridgeSpec(1, "02:00:00:00:00:01", (b.target, a.target), datapath_type="dummy"))
            assert rows(dummy_ovs) == first
            # A changed list is applied: b stays (its very row, and its connection), a goes, c comes.
            changed = BridgeSpec(1, "02:00:00:00:00:01", (b.target, c.target), datapath_type="dummy")
            assert again.ensure(changed)
            assert set(rows(dummy_ovs)) == {b.target, c.target}
            assert rows(dummy_ovs)[b.target] == first[b.target]
            c.wait_connected()
            until_written(dummy_ovs, again, changed)
            assert not again.ensure(changed)
            assert len(b.accepted) == 1, "b's connection was dropped by the change"
        finally:
            again.close()
    finally:
        for ctl in (a, b, c):
            ctl.close()


def test_switch_finds_a_returning_controller_within_a_second(dummy_ovs: DummyOVS, bridge: Bridge) -> None:
    """br0 (the agent's rows) against br1 (OVS's default backoff) on the same switch, same outage."""
    ours, default = FakeController().listen(), FakeController().listen()
    try:
        spec = BridgeSpec(1, "02:00:00:00:00:01", (ours.target,), datapath_type="dummy")
        assert bridge.ensure(spec)
        dummy_ovs.add_bridge("br1", 2, default.target)
        ours.wait_connected()
        default.wait_connected()
        until_written(dummy_ovs, bridge, spec)
        # Both controllers go away for 5.5 s: OVS's backoff grows 1, 2, 4 s (attempts at about 0, 1, 3,
        # 7 s after the drop), br0's stays at 1 s.
        ours.close()
        default.close()
        time.sleep(5.5)  # the outage itself is what is measured, not a wait for readiness
        ours.listen()
        default.listen()
        back = time.monotonic()
        ours.wait_connected(2, timeout=5)
        default.wait_connected(2, timeout=10)
        ours_s, default_s = ours.accepted[1] - back, default.accepted[1] - back
    finally:
        ours.close()
        default.close()
    print(f"reconnected after the controller listened again: max_backoff {CONTROLLER_MAX_BACKOFF_MS} ms "
          f"{ours_s:.2f} s, OVS default {default_s:.2f} s")
    assert ours_s < 1.5, f"br0 (max_backoff {CONTROLLER_MAX_BACKOFF_MS}) took {ours_s:.2f} s"
    assert default_s > ours_s + 0.5, f"positive control: the default backoff took only {default_s:.2f} s"


def outage(ctl: FakeController, seconds: float = 7.5) -> float:
    """The controller gone for ``seconds``, then back: seconds from its listening again to the switch's return.

    7.5 s: OVS's default backoff tries 1, 3, 7, 15 s after a drop (or 2, 6, 14 after a short-lived
    connection), so with it the switch comes back 6.5 s or more after the controller; with 1 s, within 1 s.
    """
    count = len(ctl.accepted)
    ctl.close()
    time.sleep(seconds)  # the outage itself is what is measured, not a wait for readiness
    ctl.listen()
    back = time.monotonic()
    ctl.wait_connected(count + 1, timeout=15)
    return ctl.accepted[count] - back


def test_a_max_backoff_written_while_the_connection_was_down_is_applied_later(
    dummy_ovs: DummyOVS, bridge: Bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OVS refreshes is_connected every ~5 s: the agent's write can land just after the controller went
    away, reach no connection, and leave the next one with OVS's default backoff (the positive control
    below). The one confirming change STATUS_LAG_S later, with the connection up, applies it."""
    monkeypatch.setattr(bridge_module, "STATUS_LAG_S", 3.0)
    ctl = FakeController().listen()
    try:
        spec = BridgeSpec(1, "02:00:00:00:00:01", (ctl.target,), datapath_type="dummy")
        assert bridge.ensure(spec)
        ctl.wait_connected()
        deadline = time.monotonic() + 10
        while not all(c.is_connected for c in bridge._bridge_row("br0").controller):
            assert time.monotonic() < deadline, "the switch never showed connected"
            time.sleep(0.02)
        count = len(ctl.accepted)
        log = dummy_ovs.dir / "ovs-vswitchd.log"
        closed = log.read_text().count("connection closed by peer")
        ctl.close()  # gone; the row still says connected for a few seconds
        while log.read_text().count("connection closed by peer") == closed:  # ovs-vswitchd has seen it
            assert time.monotonic() < deadline, "ovs-vswitchd never saw the controller go"
            time.sleep(0.01)
        assert all(c.is_connected for c in bridge._bridge_row("br0").controller), "status refreshed: retry"
        assert bridge.ensure(spec) and rows(dummy_ovs)[ctl.target][1] == str(CONTROLLER_MAX_BACKOFF_MS)
        ctl.listen()
        ctl.wait_connected(count + 1, timeout=15)
        missed = outage(ctl)  # positive control: the write reached no connection, OVS's backoff still rules
        deadline = time.monotonic() + 20
        while bridge_module.POKE_KEY not in dummy_ovs.vsctl("get", "Controller", rows(dummy_ovs)[ctl.target][0],
                                                            "external_ids"):
            assert time.monotonic() < deadline, "no confirming change was written"
            bridge.ensure(spec)
            time.sleep(0.1)
        assert not bridge.ensure(spec)  # once per write
        applied = outage(ctl)
    finally:
        ctl.close()
    print(f"after a write that missed the connection: back {missed:.2f} s after listening; after the "
          f"confirming change: {applied:.2f} s")
    assert missed > 3.0, f"positive control: the missed write still gave a 1 s retry ({missed:.2f} s)"
    assert applied < 1.5, f"after the confirming change the switch took {applied:.2f} s"
