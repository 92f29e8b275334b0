"""``portmesh``: the command line. Talks only to the API, over HTTP.

Tables for people, ``-o json`` for scripts. Exit codes: 0 done, 1 the API refused
or could not be reached (the field and reason go to stderr), 2 a usage mistake.
``lab``, ``up``, ``down``, ``demo`` and ``exec`` are handed to ``python -m portmesh.lab`` unchanged
(``up``/``down`` are the embedded single-machine deployment, which is the lab's):
the CLI must not import the lab, and the lab owns its own arguments.
"""

from __future__ import annotations

import enum
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console

from portmesh.cli import render
from portmesh.cli.client import DEFAULT_API, DEFAULT_TOKEN_FILE, DEFAULT_WAIT, Api, ApiError, quote_segment, read_token

P = ParamSpec("P")
R = TypeVar("R")

app = typer.Typer(
    name="portmesh",
    help="Standard ports on shared public IPs for containers: no NAT, no proxy.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
map_app = typer.Typer(help="Mappings: (public IP, port/proto) -> container.", no_args_is_help=True)
app.add_typer(map_app, name="map")

FOLLOW_PAUSE = 0.5  # logs -f: how often to ask for more once caught up
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


class Format(enum.StrEnum):
    table = "table"
    json = "json"


OutputOpt = Annotated[Format, typer.Option("--output", "-o", help="table for people, json for scripts")]
WaitOpt = Annotated[bool, typer.Option("--wait/--no-wait", help="Return once the change is live on every host.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for convergence.")]


def out() -> Console:
    # Built per call so it writes to whatever sys.stdout is now (CliRunner swaps it).
    return Console(highlight=False, soft_wrap=True)


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


def parse_port_spec(value: str) -> dict[str, Any]:
    """``80/tcp``, ``53/udp`` or ``80``; ranges and protocol names are the API's to judge."""
    port, _, proto = value.partition("/")
    if not port.isdigit():
        raise typer.BadParameter(f"{value!r} is not PORT or PORT/PROTO (e.g. 80/tcp)")
    return {"port": int(port), "proto": proto or "tcp"}


@app.callback()
def root(
    ctx: typer.Context,
    api: Annotated[str, typer.Option("--api", envvar="PORTMESH_API", help="API base URL")] = DEFAULT_API,
    token_file: Annotated[
        Path, typer.Option("--token-file", envvar="PORTMESH_TOKEN_FILE", help="used when PORTMESH_TOKEN is unset")
    ] = DEFAULT_TOKEN_FILE,
) -> None:
    """Standard ports on shared public IPs for containers: no NAT, no proxy."""
    ctx.obj = Api(api.rstrip("/"), read_token(token_file))


# --- containers ---


@app.command()
@handles_api_errors
def run(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="container name")],
    host: Annotated[str, typer.Option("--host", help="host to place it on")],
    ip: Annotated[list[str], typer.Option("--ip", help="public IP (repeatable)")],
    port: Annotated[list[str] | None, typer.Option("--port", "-p", help="80/tcp, mapped on every IP (repeatable)")] = None,
    image: Annotated[str | None, typer.Option("--image", help="image (Docker runtime)")] = None,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = DEFAULT_WAIT,
    output: OutputOpt = Format.table,
    command: Annotated[list[str] | None, typer.Argument(help="command to run, after --")] = None,
) -> None:
    """Create a container holding public IPs, with its ports mapped: run NAME --host H --ip IP -p 80/tcp -- CMD..."""
    body = {
        "name": name,
        "host": host,
        "ips": ip,
        "ports": [parse_port_spec(p) for p in port or []],
        "command": command or [],
        "image": image,
    }
    api = api_of(ctx)
    result = api.write("POST", "/v1/containers", body, wait=wait, wait_timeout=timeout)
    if wait:
        # Converged means the agent has tried; a command that cannot start is reported, not hidden.
        status = api.get(f"/v1/containers/{quote_segment(name)}").get("status") or {}
        if status.get("state") == "error":
            raise ApiError(0, "command", f"{name} was created but did not start: {status.get('message')}")
    if output is Format.json:
        emit_json(result)
    else:
        render.write(out(), f"{name} created on {host}", result)


@app.command()
@handles_api_errors
def ps(ctx: typer.Context, output: OutputOpt = Format.table) -> None:
    """List containers."""
    items = api_of(ctx).get("/v1/containers")
    emit_json(items) if output is Format.json else render.containers(out(), items)


@app.command()
@handles_api_errors
def inspect(ctx: typer.Context, name: str, output: OutputOpt = Format.table) -> None:
    """Show one container: IPs, MAC, port block, status, mappings."""
    item = api_of(ctx).get(f"/v1/containers/{quote_segment(name)}")
    emit_json(item) if output is Format.json else render.container(out(), item)


def _container_write(
    ctx: typer.Context, method: str, name: str, action: str, verb: str, *, wait: bool, timeout: float, output: Format
) -> None:
    path = f"/v1/containers/{quote_segment(name)}{action}"
    result = api_of(ctx).write(method, path, wait=wait, wait_timeout=timeout)
    emit_json(result) if output is Format.json else render.write(out(), f"{name} {verb}", result)


@app.command()
@handles_api_errors
def stop(
    ctx: typer.Context, name: str, wait: WaitOpt = True, timeout: TimeoutOpt = DEFAULT_WAIT, output: OutputOpt = Format.table
) -> None:
    """Stop a container (it keeps its IPs, block and mappings)."""
    _container_write(ctx, "POST", name, "/stop", "stopped", wait=wait, timeout=timeout, output=output)


@app.command()
@handles_api_errors
def start(
    ctx: typer.Context, name: str, wait: WaitOpt = True, timeout: TimeoutOpt = DEFAULT_WAIT, output: OutputOpt = Format.table
) -> None:
    """Start a stopped container."""
    _container_write(ctx, "POST", name, "/start", "started", wait=wait, timeout=timeout, output=output)


@app.command()
@handles_api_errors
def rm(
    ctx: typer.Context, name: str, wait: WaitOpt = True, timeout: TimeoutOpt = DEFAULT_WAIT, output: OutputOpt = Format.table
) -> None:
    """Remove a container and its mappings."""
    _container_write(ctx, "DELETE", name, "", "removed", wait=wait, timeout=timeout, output=output)


@app.command()
@handles_api_errors
def logs(
    ctx: typer.Context,
    name: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new output (Ctrl-C to stop).")] = False,
    tail: Annotated[int | None, typer.Option("--tail", "-n", min=0, help="Only the last N lines.")] = None,
) -> None:
    """Print a container's output (what its command wrote to stdout and stderr)."""
    api = api_of(ctx)
    path = f"/v1/containers/{quote_segment(name)}/logs"
    chunk = api.request("GET", path, params={"tail": str(tail)} if tail is not None else None)
    try:
        while True:
            sys.stdout.write(chunk["text"])
            sys.stdout.flush()
            if not follow:
                return
            if not chunk["text"]:
                time.sleep(FOLLOW_PAUSE)
            chunk = api.request("GET", path, params={"offset": str(chunk["offset"])})
    except KeyboardInterrupt:
        return


# --- mappings ---


@map_app.command("add")
@handles_api_errors
def map_add(
    ctx: typer.Context,
    ip: Annotated[str, typer.Argument(help="public IP")],
    port: Annotated[str, typer.Argument(help="PORT/PROTO, e.g. 80/tcp")],
    container: Annotated[str, typer.Argument(help="container that answers")],
    wait: WaitOpt = True,
    timeout: TimeoutOpt = DEFAULT_WAIT,
    output: OutputOpt = Format.table,
) -> None:
    """Map IP PORT/PROTO to CONTAINER."""
    body = {"public_ip": ip, **parse_port_spec(port), "container": container}
    result = api_of(ctx).write("POST", "/v1/mappings", body, wait=wait, wait_timeout=timeout)
    m = result["mapping"]
    what = f"{m['public_ip']}:{m['port']}/{m['proto']} -> {m['container']}"
    emit_json(result) if output is Format.json else render.write(out(), what, result)


@map_app.command("ls")
@handles_api_errors
def map_ls(ctx: typer.Context, output: OutputOpt = Format.table) -> None:
    """List mappings."""
    items = api_of(ctx).get("/v1/mappings")
    emit_json(items) if output is Format.json else render.mappings(out(), items)


@map_app.command("rm")
@handles_api_errors
def map_rm(
    ctx: typer.Context,
    ip: Annotated[str, typer.Argument(help="public IP")],
    port: Annotated[str, typer.Argument(help="PORT/PROTO, e.g. 80/tcp")],
    wait: WaitOpt = True,
    timeout: TimeoutOpt = DEFAULT_WAIT,
    output: OutputOpt = Format.table,
) -> None:
    """Remove the mapping of IP PORT/PROTO."""
    spec = parse_port_spec(port)
    path = f"/v1/mappings/{quote_segment(ip)}/{quote_segment(spec['proto'])}/{spec['port']}"
    result = api_of(ctx).write("DELETE", path, wait=wait, wait_timeout=timeout)
    what = f"{ip}:{spec['port']}/{spec['proto']} unmapped"
    emit_json(result) if output is Format.json else render.write(out(), what, result)


# --- hosts and convergence ---


@app.command()
@handles_api_errors
def hosts(ctx: typer.Context, output: OutputOpt = Format.table) -> None:
    """List hosts and the generation each one's switch and agent have realised."""
    items = api_of(ctx).get("/v1/hosts")
    emit_json(items) if output is Format.json else render.hosts(out(), items)


@app.command()
@handles_api_errors
def status(ctx: typer.Context, output: OutputOpt = Format.table) -> None:
    """Is every change live everywhere? The store's generation against each host's."""
    st = api_of(ctx).get("/v1/status")
    emit_json(st) if output is Format.json else render.status(out(), st)


# --- the lab, by hand-over (never imported) ---


def exec_lab(args: list[str]) -> None:
    """Replace this process with ``python -m portmesh.lab ARGS`` (same interpreter, same venv)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "portmesh.lab", *args])


@app.command(context_settings=PASS_THROUGH, add_help_option=False)
def lab(ctx: typer.Context) -> None:
    """Build, inspect and tear down a lab cloud: `portmesh lab up|down|...` (python -m portmesh.lab)."""
    exec_lab(list(ctx.args))


@app.command(context_settings=PASS_THROUGH, add_help_option=False)
def up(ctx: typer.Context) -> None:
    """Start the embedded single-machine deployment: store, controller, agent, API (python -m portmesh.lab up)."""
    exec_lab(["up", *ctx.args])


@app.command(context_settings=PASS_THROUGH, add_help_option=False)
def down(ctx: typer.Context) -> None:
    """Stop what `up` started and remove exactly what it made (python -m portmesh.lab down)."""
    exec_lab(["down", *ctx.args])


@app.command(context_settings=PASS_THROUGH, add_help_option=False)
def demo(ctx: typer.Context) -> None:
    """Run the demo in a lab (python -m portmesh.lab demo)."""
    exec_lab(["demo", *ctx.args])


@app.command("exec", context_settings={"ignore_unknown_options": True})
def exec_(
    name: Annotated[str, typer.Argument(help="container name")],
    command: Annotated[list[str], typer.Argument(help="command to run inside it, after --")],
) -> None:
    """Run a command in a container's namespaces: exec NAME -- CMD... (via the lab for now)."""
    exec_lab(["exec", name, "--", *command])


def main() -> None:
    """Console-script entry point (``portmesh``)."""
    app()


if __name__ == "__main__":
    main()
