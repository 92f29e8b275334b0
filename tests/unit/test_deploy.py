"""The shipped deployment files (deploy/, docs/deploy.md) run what the components really accept.

A unit file is only text until a machine boots it: a renamed flag, a variable missing from the
example environment file or a console script pointing nowhere would surface on an operator's
host, not here. So every unit's ExecStart is expanded as systemd does (``${VAR}`` inside a
word, ``$VAR`` as a word split at whitespace) with its example EnvironmentFile, and handed to
the real ``main`` its console script names, whose argument parser runs and is then stopped:
no process starts. Every daemon and CLI command line shown in docs/deploy.md gets the same
treatment, so the document cannot drift from the flags. ``systemd-analyze verify`` checks the
units' own syntax where it is installed.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer._click.core import Command, Context  # typer vendors click; its commands are of these types
from typer._click.exceptions import UsageError
from typer.core import TyperGroup

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
DOC = ROOT / "docs" / "deploy.md"
INSTALLED_BIN = "/opt/portmesh/bin/"
COMPONENTS = ("store", "controller", "api", "agent")


class Parsed(Exception):
    """Raised by the patched parser once the real one has accepted the arguments."""

    def __init__(self, namespace: argparse.Namespace) -> None:
        super().__init__("parsed")
        self.namespace = namespace


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of a unit file, continuation lines joined, comments dropped."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_value(path: Path, key: str) -> str:
    values = [v for _, k, v in unit_entries(path) if k == key]
    assert len(values) == 1, f"{path.name}: expected one {key}=, found {values}"
    return values[0]


def read_env_file(path: Path) -> dict[str, str]:
    """An EnvironmentFile= as systemd reads it (KEY=VALUE lines, # comments, optional quotes)."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()), f"{path.name}: bad line {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def expand_exec(command: str, env: dict[str, str]) -> list[str]:
    """systemd's ExecStart expansion: ``$VAR`` alone is split into words, ``${VAR}`` is one word's text."""
    words: list[str] = []
    for word in shlex.split(command):
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            words.extend(env.get(whole[1], "").split())
            continue
        for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", word):
            assert name in env, f"${{{name}}} is not set by the example environment file"
        words.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m[1]], word))
    return words


def console_scripts() -> dict[str, str]:
    scripts: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return scripts


def entry_point(script: str) -> Callable[..., Any]:
    target = console_scripts()[script]
    module, _, attr = target.partition(":")
    main: Callable[..., Any] = getattr(importlib.import_module(module), attr)
    return main


def parse_with_real_parser(main: Callable[..., Any], argv: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """Run ``main(argv)`` until its parser has accepted ``argv``; a usage error fails the test."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        raise Parsed(original(self, args, namespace))

    def no_exit(self: argparse.ArgumentParser, status: int = 0, message: str | None = None) -> Any:
        raise AssertionError(f"{self.prog} rejected {argv}: {message}")

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        m.setattr(argparse.ArgumentParser, "exit", no_exit)
        with pytest.raises(Parsed) as parsed:
            main(argv)
    return parsed.value.namespace


def test_units_and_env_files_exist() -> None:
    assert {u.name for u in UNITS} == {f"portmesh-{c}.service" for c in COMPONENTS}
    for component in COMPONENTS:
        assert (DEPLOY / "env" / f"{component}.env").is_file()


def test_console_scripts_point_at_each_components_main() -> None:
    scripts = console_scripts()
    assert scripts["portmesh"] == "portmesh.cli.app:main"
    for component in COMPONENTS:
        assert scripts[f"portmesh-{component}"] == f"portmesh.{component}.__main__:main"
        assert callable(entry_point(f"portmesh-{component}"))


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.stem)
def test_unit_execstart_parses_with_the_components_parser(unit: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    component = unit.stem.removeprefix("portmesh-")
    env_file = unit_value(unit, "EnvironmentFile")
    assert env_file == f"/etc/portmesh/{component}.env"
    env = read_env_file(DEPLOY / "env" / f"{component}.env")
    argv = expand_exec(unit_value(unit, "ExecStart"), env)
    assert argv[0] == f"{INSTALLED_BIN}portmesh-{component}", argv[0]
    assert unit_value(unit, "Restart") == "on-failure"
    if component != "store":  # they wait for a store (and the agent for a controller) on another host
        assert unit_value(unit, "StartLimitIntervalSec") == "0"
    args = parse_with_real_parser(entry_point(Path(argv[0]).name), argv[1:], monkeypatch)

    # What each unit must hand over, checked on the parsed values, not on the text.
    if component == "store":
        assert args.command == "serve" and args.tcp == env["STORE_TCP"]
        assert str(args.db) == env["STORE_DB"] and str(args.socket) == env["STORE_SOCKET"]
    elif component == "controller":
        assert args.store == env["PORTMESH_STORE"] and args.listen.startswith("tcp:") and args.listen.endswith(":6653")
    elif component == "api":
        assert args.store == env["PORTMESH_STORE"] and str(args.token_file) == env["API_TOKEN_FILE"]
    else:
        assert args.host == env["AGENT_HOST"] and args.store == env["PORTMESH_STORE"]
        assert args.controller == env["AGENT_CONTROLLER"] and args.ovsdb == env["AGENT_OVSDB"]
        assert args.underlay_dev == env["AGENT_UNDERLAY_DEV"]


def test_expansion_follows_systemd() -> None:
    env = {"A": "x y", "B": "", "C": "c"}
    assert expand_exec("/bin/p --c ${C} $A $B --both ${A}", env) == ["/bin/p", "--c", "c", "x", "y", "--both", "x y"]
    with pytest.raises(AssertionError, match="MISSING"):
        expand_exec("/bin/p ${MISSING}", env)


def test_agent_unit_keeps_containers_on_stop_and_needs_open_vswitch() -> None:
    unit = DEPLOY / "systemd" / "portmesh-agent.service"
    assert unit_value(unit, "KillMode") == "process"  # a stopped agent leaves its light containers running
    assert "openvswitch-switch.service" in unit_value(unit, "Requires").split()
    assert "openvswitch-switch.service" in unit_value(unit, "After").split()
    # A private mount namespace would hide the agent's /run/netns mounts from the host.
    keys = {k for _, k, _ in unit_entries(unit)}
    assert not keys & {"ProtectSystem", "PrivateTmp", "ProtectHome", "PrivateDevices", "ReadOnlyPaths", "CapabilityBoundingSet"}


def test_unprivileged_units_drop_every_capability() -> None:
    for component in ("store", "controller", "api"):
        unit = DEPLOY / "systemd" / f"portmesh-{component}.service"
        assert unit_value(unit, "CapabilityBoundingSet") == ""
        assert unit_value(unit, "NoNewPrivileges") == "yes"
        assert unit_value(unit, "ProtectSystem") == "strict"
        # Under a read-only system ovsdb-server still needs a writable /tmp ("failed to create temporary
        # file"): PrivateTmp gives it one of its own.
        assert unit_value(unit, "PrivateTmp") == "yes"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """The units as systemd reads them; binaries and env files point at stand-ins (verify wants them present)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for component in COMPONENTS:
        stub = bindir / f"portmesh-{component}"
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    copies = []
    for unit in UNITS:
        text = unit.read_text().replace(INSTALLED_BIN, f"{bindir}/").replace("/etc/portmesh/", f"{DEPLOY}/env/")
        copy = tmp_path / unit.name
        copy.write_text(text)
        copies.append(str(copy))
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *copies], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    # verify exits 0 on ignored (mistyped) settings: any line naming our units is a finding.
    findings = [line for line in (done.stdout + done.stderr).splitlines() if "portmesh-" in line]
    assert done.returncode == 0 and not findings, done.stdout + done.stderr
    # Positive control: a mistyped value in one of our units is reported.
    broken = Path(copies[0])
    broken.write_text(broken.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(broken)], capture_output=True, text=True, timeout=60)
    assert "sometimes" in done.stdout + done.stderr and broken.name in done.stdout + done.stderr


# ---- docs/deploy.md: every command line it shows parses ----

DAEMON = re.compile(
    r"^(?:/opt/portmesh/bin/)?portmesh-(store|controller|api|agent)\b|^python3? -m portmesh\.(store|controller|api|agent)\b"
)


def doc_commands() -> Iterator[list[str]]:
    """Command lines in the document's fenced blocks (``$ ``/``# `` prompts dropped, ``\\`` continuations joined)."""
    in_block = False
    pending = ""
    for raw in DOC.read_text().splitlines():
        if raw.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            continue
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        line = re.sub(r"^(?:[\w@.-]*[$#] )", "", line)
        line = re.sub(r"^(?:sudo )", "", line)
        if line.startswith(("portmesh", "/opt/portmesh/bin/portmesh", "python -m portmesh", "python3 -m portmesh")):
            yield shlex.split(line, comments=True)


def test_doc_exists_and_shows_each_daemon() -> None:
    shown = {m[1] or m[2] for words in doc_commands() if (m := DAEMON.match(" ".join(words)))}
    assert shown >= {"store", "agent"}, shown


def test_doc_daemon_command_lines_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    checked = 0
    for words in doc_commands():
        m = DAEMON.match(" ".join(words))
        if not m:
            continue
        component = m[1] or m[2]
        argv = words[3:] if words[0].startswith("python") else words[1:]
        if argv in (["--help"], ["-h"]):
            continue
        parse_with_real_parser(entry_point(f"portmesh-{component}"), argv, monkeypatch)
        checked += 1
    assert checked


def test_doc_cli_command_lines_parse() -> None:
    """``portmesh ...`` lines: each subcommand exists and click accepts its options and arguments."""
    from portmesh.cli.app import app

    root = typer.main.get_command(app)
    checked = 0
    for words in doc_commands():
        if words[0] != "portmesh" or len(words) < 2 or words[1] in ("lab", "demo", "up"):
            continue
        command: Command = root
        args = words[1:]
        path = ["portmesh"]
        while isinstance(command, TyperGroup) and args and not args[0].startswith("-"):
            sub = command.get_command(Context(command), args[0])
            assert sub is not None, f"docs/deploy.md shows {' '.join(words)!r}: no command {' '.join([*path, args[0]])!r}"
            path.append(args.pop(0))
            command = sub
        if "--help" in args:
            continue
        try:
            command.make_context(" ".join(path), list(args))
        except UsageError as exc:
            raise AssertionError(f"docs/deploy.md shows {' '.join(words)!r}: {exc.format_message()}") from exc
        checked += 1
    assert checked


def test_lab_runs_the_daemons_with_the_units_flags() -> None:
    """The lab is the deployment in namespaces: each daemon gets the flags its unit passes (issue 12).

    Compared by flag name, not value (addresses and paths differ); the units' optional extras
    (``$..._ARGS``) are left out, and the lab may add only what namespaces need.
    """
    from portmesh.lab import services

    lab_only = {"--netns-prefix", "--log-file"}  # containers' namespace names; the lab's log layout
    labdir = Path("/run/portmesh/x")
    lab = {
        "store": services.store_argv(labdir),
        "controller": services.controller_argv(labdir),
        "api": services.api_argv(labdir, 8470),
        "agent": services.agent_argv(labdir, "h2", "unix:/run/portmesh/x/h2/db.sock", "pm-x-"),
    }
    for component, argv in lab.items():
        unit = DEPLOY / "systemd" / f"portmesh-{component}.service"
        env = {k: ("" if k.endswith("_ARGS") else v) for k, v in read_env_file(DEPLOY / "env" / f"{component}.env").items()}
        unit_flags = {w for w in expand_exec(unit_value(unit, "ExecStart"), env) if w.startswith("--")}
        lab_flags = {w for w in argv if w.startswith("--")}
        assert argv[1:3] == ["-m", f"portmesh.{component}"], argv
        assert unit_flags <= lab_flags, f"{component}: the lab does not pass {sorted(unit_flags - lab_flags)}"
        missing = sorted(lab_flags - unit_flags - lab_only)
        assert not missing, f"{component}: the unit does not pass {missing}"
