"""`portmesh lab fault ...` without a lab: clear one-line errors, exit codes, nothing touched.

What each fault does to a real lab is tests/lab/test_faults.py's to show; here only the command
surface: the names stay (issue 13 item 8), a bad signal is a usage error, a missing lab exit 1.
"""

from __future__ import annotations

import os
import signal

import pytest
from typer.testing import CliRunner

from portmesh.lab import faults
from portmesh.lab.cli import app

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="lab commands need root")

runner = CliRunner()
NOLAB = f"nolab{os.getpid() % 10000}"


@pytest.mark.parametrize(
    "argv",
    [["kill-controller"], ["kill-controller", "--signal", "TERM"], ["restart-switch", "h2"], ["kill-agent", "h2"],
     ["kill-store-member", "1"]],
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
    for name in ("kill-controller", "restart-switch", "kill-agent", "kill-store-member"):
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
