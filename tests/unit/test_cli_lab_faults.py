"""`portmesh lab fault ...` without a lab: clear one-line errors, exit codes, nothing touched.

What each fault does to a real lab is tests/lab/test_faults.py's to show; here only the command
surface: the names stay (issue 13 item 8), a bad signal is a usage error, a missing lab exit 1.
"""

from __future__ import annotations

import os
import signal

import pytest
from typer.testing import CliRunner

from portmesh.lab import faults, ha
from portmesh.lab.cli import app

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="lab commands need root")

runner = CliRunner()
NOLAB = f"nolab{os.getpid() % 10000}"


@pytest.mark.parametrize(
    "argv",
    [["kill-controller"], ["kill-controller", "--signal", "TERM"], ["restart-switch", "h2"], ["kill-agent", "h2"],
     ["kill-store-member", "1"], ["kill-store-member", "leader"], ["kill-controller", "--which", "standby"],
     ["freeze-switch", "h1"], ["freeze-switch", "h1", "--seconds", "2"]],
)
def test_a_fault_on_a_lab_that_is_not_up_is_one_line_and_exit_1(argv: list[str]) -> None:
    result = runner.invoke(app, ["fault", *argv, "--name", NOLAB])
    assert result.exit_code == 1, result.output
    assert result.output.strip() == f"error: lab {NOLAB} is not up"


def test_a_signal_other_than_kill_or_term_is_a_usage_error() -> None:
    result = runner.invoke(app, ["fault", "kill-controller", "--signal", "HUP", "--name", NOLAB])
    assert result.exit_code == 2
    assert "--signal" in result.output and "HUP" in result.output


def test_the_fault_names_stay() -> None:
    result = runner.invoke(app, ["fault", "--help"])
    assert result.exit_code == 0
    for name in ("kill-controller", "restart-switch", "kill-agent", "kill-store-member", "freeze-switch"):
        assert name in result.output


def test_a_report_says_what_was_done_and_how_long_it_took() -> None:
    report = faults.FaultReport("kill-controller", "controller", 10, 11, signal.SIGKILL.name.removeprefix("SIG"), 0.01, 0.02,
                                1.5, 0, {"switch h1 reconnected": 1.5})
    text = "\n".join(report.lines())
    assert "pid 10 got SIGKILL" in text and "restarted as pid 11" in text
    assert "back 1.50 s" in text and "switch h1 reconnected: 1.50 s" in text
    assert "flow-mods sent by the controller meanwhile: 0" in text


def test_log_lines_are_read_as_the_controller_writes_them() -> None:
    """The waits parse the controller's own log lines: pin their shapes (controller/service.py, switch.py)."""
    line = "INFO switch 0000000000000002 connected from ('198.18.0.12', 42378) with 19 flows"
    m = faults.CONNECTED_RE.search(line)
    assert m is not None and m[1] == "0000000000000002" and m[2] == "19"
    log = "switch 0000000000000002: 19 flows added, 2 deleted\nswitch 0000000000000001: 1 flows added, 0 deleted"
    assert faults.flow_mods_in(log) == 22


def test_the_echo_drop_is_read_as_the_controller_logs_it() -> None:
    """freeze-switch waits for controller/connection.py's warning: pin its shape."""
    line = ("WARNING switch 0000000000000002 (('198.18.0.12', 40122)): no reply to an echo request within 5 s "
            "after 5 s of silence; dropping the connection")
    m = faults.ECHO_DROP_RE.search(line)
    assert m is not None and m[1] == "0000000000000002"
    assert faults.ECHO_DROP_RE.search("switch 0000000000000002 connected from x with 3 flows") is None


def test_a_freeze_report_says_when_it_was_noticed_and_when_it_was_back() -> None:
    report = faults.FaultReport("freeze-switch", "ovs-vswitchd:h2", 7, 7, "STOP", 9.8, 9.8, 1.4, 0,
                                {"dropped by echo": 9.8, "reconnected": 1.36, "programmed": 1.4})
    text = "\n".join(report.lines())
    assert "pid 7 got SIGSTOP; the controller dropped it by echo 9.80 s after the freeze" in text
    assert "back (reconnected and programmed) 1.40 s later" in text and "reconnected: 1.36 s" in text
    assert "flow-mods sent to the switch meanwhile: 0" in text
    missed = faults.FaultReport("freeze-switch", "ovs-vswitchd:h2", 7, 7, "STOP", 2.0, 2.0, 0.05, 0, {"programmed": 0.05})
    assert "did not drop it by echo within 2.00 s" in "\n".join(missed.lines())


def test_freeze_seconds_must_be_positive() -> None:
    result = runner.invoke(app, ["fault", "freeze-switch", "h1", "--seconds", "0", "--name", NOLAB])
    assert result.exit_code == 2 and "--seconds" in result.output


@pytest.mark.parametrize("argv", [["kill-store-member", "first"], ["kill-controller", "--which", "primary"]])
def test_a_member_or_controller_that_is_no_name_nor_number_is_a_usage_error(argv: list[str]) -> None:
    result = runner.invoke(app, ["fault", *argv, "--name", NOLAB])
    assert result.exit_code == 2
    assert argv[-1] in result.output


CLUSTER_STATUS = """a5c1
Name: Portmesh
Cluster ID: 0b4e (0b4e6c1c-5a4d-4b7e-9f4b-2e0f6f0c3a11)
Server ID: a5c1 (a5c1f9e2-7d3b-4c1a-8e1f-0d9c2b7a6e55)
Address: tcp:198.18.0.1:6645
Status: cluster member
Role: follower
Term: 3
Leader: 77d0
Vote: 77d0

Last Election started 1234 ms ago, reason: leadership_transfer
Election timer: 1000
Log: [2, 14]
Entries not yet committed: 0
Entries not yet applied: 0
Connections: ->77d0 ->3f21 <-77d0 <-3f21
Disconnections: 1
Servers:
    77d0 (77d0 at tcp:198.18.0.1:6644) next_index=14 match_index=13
    a5c1 (a5c1 at tcp:198.18.0.1:6645) (self)
    3f21 (3f21 at tcp:198.18.0.1:6646) next_index=14 match_index=13
"""


def test_a_members_cluster_status_is_read_as_ovsdb_server_writes_it() -> None:
    st = ha.parse_cluster_status(2, CLUSTER_STATUS)
    assert (st.member, st.role, st.status, st.term, st.servers) == (2, "follower", "cluster member", 3, 3)
    assert st.member_of_cluster
    joining = ha.parse_cluster_status(3, "Name: Portmesh\nStatus: joining cluster\nRole: follower\nTerm: 0\n")
    assert not joining.member_of_cluster and joining.servers == 0
