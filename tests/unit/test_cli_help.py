"""Help is for people: ``portmesh lab`` (not ``python -m portmesh.lab``), and no Sphinx markup anywhere."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from portmesh.cli import app as cli
from portmesh.lab import cli as lab_cli

PORTMESH = str(Path(sys.executable).parent / "portmesh")
MARKUP = re.compile(r"``|:(mod|class|func|meth|data|attr):`")

OUTER = [[], ["run"], ["ps"], ["inspect"], ["stop"], ["start"], ["rm"], ["logs"], ["exec"], ["hosts"], ["status"]]
OUTER += [["map"], ["map", "add"], ["map", "ls"], ["map", "rm"], ["map", "inspect"], ["map", "policy"]]
OUTER += [["map", "backend"], ["map", "backend", "add"], ["map", "backend", "rm"], ["map", "backend", "weight"]]
OUTER += [["map", "health"]]
OUTER += [["host"], ["host", "add"], ["host", "rm"], ["pool"], ["pool", "ls"], ["pool", "add"], ["pool", "rm"]]
OUTER += [["config"], ["config", "show"], ["config", "set"]]
LAB = [[], ["up"], ["down"], ["status"], ["env"], ["exec"], ["demo"]]


@pytest.mark.parametrize("words", OUTER, ids=lambda w: " ".join(w) or "portmesh")
def test_outer_help_is_plain(words: list[str]) -> None:
    r = CliRunner().invoke(cli.app, [*words, "--help"])
    assert r.exit_code == 0, r.output
    assert not MARKUP.search(r.stdout), r.stdout


@pytest.mark.parametrize("words", LAB, ids=lambda w: " ".join(w) or "lab")
def test_lab_help_is_plain_and_says_portmesh_lab(words: list[str]) -> None:
    r = CliRunner().invoke(lab_cli.app, [*words, "--help"], prog_name=lab_cli.PROG)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"Usage: portmesh lab {' '.join(words)}".rstrip()), r.stdout[:200]
    assert not MARKUP.search(r.stdout) and "python -m" not in r.stdout, r.stdout


def test_lab_help_through_the_real_command() -> None:
    done = subprocess.run([PORTMESH, "lab", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("Usage: portmesh lab "), done.stdout + done.stderr
    assert "python -m" not in done.stdout and not MARKUP.search(done.stdout)
    done = subprocess.run([PORTMESH, "lab", "exec", "--help"], capture_output=True, text=True, timeout=60)
    assert done.stdout.startswith("Usage: portmesh lab exec "), done.stdout


def test_markup_pattern_finds_what_the_old_help_had() -> None:
    assert MARKUP.search("build a lab (see :mod:`portmesh.lab.network`)") and MARKUP.search("what ``up`` recorded")
