"""What every ``portmesh`` command shares: output format, wait options, the console, error handling.

A module of its own so command groups in other modules (:mod:`portmesh.cli.cloud`) use the
same options and the same one-line refusal as :mod:`portmesh.cli.app`.
"""

from __future__ import annotations

import enum
import functools
import json
import sys
from collections.abc import Callable
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console

from portmesh.cli import render
from portmesh.cli.client import Api, ApiError

P = ParamSpec("P")
R = TypeVar("R")


class Format(enum.StrEnum):
    table = "table"
    json = "json"


OutputOpt = Annotated[Format, typer.Option("--output", "-o", help="table for people, json for scripts")]
WaitOpt = Annotated[
    bool,
    typer.Option("--wait/--no-wait", help="Return once the change is live on the hosts it concerns and every host that is up."),
]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=0.1, max=3600, help="Seconds to wait for convergence.")]


def out() -> Console:
    """A console that prints machine text literally: no markup, no ``:emoji:`` codes, no highlighting.

    Built per call so it writes to whatever sys.stdout is now (CliRunner swaps it). Off a
    terminal, tables are as wide as their content (a pipe has no width to wrap at).
    """
    width = None if sys.stdout.isatty() else render.PIPE_WIDTH
    return Console(highlight=False, soft_wrap=True, markup=False, emoji=False, width=width)


def emit_json(body: Any) -> None:
    typer.echo(json.dumps(body, indent=2))


def handles_api_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn an :class:`ApiError` into ``error: <field>: <reason>`` on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except ApiError as exc:
            typer.echo(f"error: {exc.describe()}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def api_of(ctx: typer.Context) -> Api:
    api: Api = ctx.ensure_object(Api) if ctx.obj is None else ctx.obj
    return api
