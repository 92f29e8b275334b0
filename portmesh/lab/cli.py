"""``python -m portmesh.lab``: build, inspect, enter and remove a lab (see :mod:`portmesh.lab.network`)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Annotated

import typer
from rich.console import Console

from portmesh.lab import node
from portmesh.lab.network import Lab

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

NameOpt = Annotated[str, typer.Option("--name", "-n", help="lab name (namespaces are pm-<name>-*)")]


def _need_root() -> None:
    if os.geteuid() != 0:
        typer.echo("the lab makes namespaces and runs OVS: run it as root", err=True)
        raise typer.Exit(2)


@app.command()
def up(
    hosts: Annotated[int, typer.Option(min=1, max=50, help="number of hosts")] = 1,
    name: NameOpt = "lab",
    tune_rmem: Annotated[bool, typer.Option(help="raise net.core.rmem_default to 4 MiB while up")] = True,
) -> None:
    """Build the lab: namespaces, links, one OVS per host, store, controller, agents, API."""
    _need_root()
    try:
        with progress(f"lab {name}: starting") as say:
            state = Lab(name, say=say).up(hosts, tune_rmem=tune_rmem)
    except Exception as exc:
        typer.echo(f"lab up failed: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"lab {name} is up; state in {state.dir}")


@contextlib.contextmanager
def progress(first: str) -> Iterator[Callable[[str], None]]:
    """A spinner with the running step and the elapsed time (on a terminal); each finished step is logged.

    Bring-up takes seconds (namespaces, one OVS per host, the components): say what it is doing.
    Off a terminal rich prints only the step lines, so scripts and logs stay clean.
    """
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    start = time.monotonic()
    with console.status(first) as spinner:

        def say(msg: str) -> None:
            console.print(f"[{time.monotonic() - start:5.1f}s] {msg}", markup=False)
            spinner.update(f"{msg} ...")

        yield say


@app.command()
def demo(name: NameOpt = "lab") -> None:
    """Lab up, sample containers sharing public IPs, and a real outside client reaching each mapping."""
    _need_root()
    from portmesh.lab.demo import run_demo

    try:
        run_demo(name)
    except Exception as exc:
        typer.echo(f"demo failed: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def down(name: NameOpt = "lab") -> None:
    """Remove exactly what ``up`` recorded and put machine-wide settings back."""
    _need_root()
    if Lab(name).down():
        raise typer.Exit(1)


@app.command()
def status(name: NameOpt = "lab") -> None:
    """Show what the lab recorded and whether it is still alive (JSON)."""
    typer.echo(json.dumps(Lab(name).status(), indent=2))


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_(
    target: Annotated[str, typer.Argument(metavar="NODE", help="inet, mgmt, h1... or a container name")],
    command: Annotated[list[str], typer.Argument(help="command to run there (after --)")],
    name: NameOpt = "lab",
) -> None:
    """Run a command inside a lab node's or a container's network namespace."""
    _need_root()
    try:
        ns = Lab(name).netns_of(target)
    except (LookupError, OSError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    sys.stdout.flush()
    node.exec_in(ns, command)


def main() -> None:
    app(prog_name="python -m portmesh.lab")
