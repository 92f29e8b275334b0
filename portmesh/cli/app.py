"""``portmesh``: the command line. Talks only to the API, over HTTP.

Tables for people, ``-o json`` for scripts. Exit codes: 0 done, 1 the API refused
or could not be reached (the field and reason go to stderr), 2 a usage mistake.
``lab``, ``up``, ``down`` and ``demo`` are handed to ``python -m portmesh.lab`` exactly as typed,
``--`` included (``up``/``down`` are the embedded single-machine deployment, which is the lab's):
the CLI must not import the lab, and the lab owns its own arguments. ``exec`` asks the API
where a container is and enters its namespaces here (:mod:`portmesh.cli.enter`).
Names are checked with the model's own rule before they become part of a URL.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
import typer.core
from typer._click.core import Context as ClickContext  # typer vendors click; its Command names this type

from portmesh.cli import cloud, enter, mappings, render
from portmesh.cli.args import check_name, check_names, published
from portmesh.cli.client import (
    DEFAULT_API,
    DEFAULT_TOKEN_FILE,
    DEFAULT_WAIT,
    Api,
    ApiError,
    TokenError,
    quote_segment,
    read_token,
    valid_url,
)
from portmesh.cli.common import (
    Format,
    OutputOpt,
    TimeoutOpt,
    WaitOpt,
    api_of,
    emit_json,
    handles_api_errors,
    out,
)
from portmesh.model.entities import RestartPolicy

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
mappings.register(app)
cloud.register(app)

FOLLOW_PAUSE = 0.5  # logs -f: how often to ask for more once caught up
LAB_COMMANDS = ("lab", "up", "down", "demo")


class RawArgs(typer.core.TyperCommand):
    """A command that parses nothing: its arguments reach ``ctx.args`` exactly as typed, ``--`` included.

    Click drops the first ``--`` and treats what follows an unknown option as its value,
    so handing ``ctx.args`` of a normal command to another parser loses information
    (``lab exec inet -- ping -n -c 1 X`` would give the lab ``-n -c`` as its ``--name``).
    """

    def parse_args(self, ctx: ClickContext, args: list[str]) -> list[str]:
        ctx.args = list(args)
        return []


def complete_names(ctx: typer.Context, incomplete: str) -> list[str]:
    """Shell completion of container names, asked from the API; no answer means no completions."""
    try:
        # The root callback does not run while completing: read --api/--token-file (or their env) here.
        root = ctx.find_root().params
        url = str(root.get("api") or os.environ.get("PORTMESH_API") or DEFAULT_API).rstrip("/")
        token_file = Path(root.get("token_file") or os.environ.get("PORTMESH_TOKEN_FILE") or DEFAULT_TOKEN_FILE)
        items = Api(url, read_token(token_file)).request("GET", "/v1/containers", timeout=2.0)
        return [str(c["name"]) for c in items if str(c["name"]).startswith(incomplete)]
    except Exception:  # completion must never print an error into the user's command line
        return []


NameArg = Annotated[
    str, typer.Argument(metavar="NAME", help="container name", callback=check_name, autocompletion=complete_names)
]


@app.callback()
def root(
    ctx: typer.Context,
    api: Annotated[str, typer.Option("--api", envvar="PORTMESH_API", help="API base URL")] = DEFAULT_API,
    token_file: Annotated[
        Path, typer.Option("--token-file", envvar="PORTMESH_TOKEN_FILE", help="used when PORTMESH_TOKEN is unset")
    ] = DEFAULT_TOKEN_FILE,
) -> None:
    """Standard ports on shared public IPs for containers: no NAT, no proxy."""
    if ctx.invoked_subcommand in LAB_COMMANDS:  # handed to the lab, which needs neither
        return
    if not valid_url(api):
        raise typer.BadParameter(f"{api!r} is not an http:// or https:// URL", param_hint="'--api' / PORTMESH_API")
    try:
        token = read_token(token_file)
    except TokenError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--token-file' / PORTMESH_TOKEN_FILE / PORTMESH_TOKEN") from None
    ctx.obj = Api(api.rstrip("/"), token)


# --- containers ---


NO_NAME = ""  # what RunCommand gives NAME when only a command follows "--"


class RunCommand(typer.core.TyperCommand):
    """``run`` whose words after ``--`` are always the command, never its NAME.

    Click fills positional arguments from after ``--`` too, so ``run --ip IP -- sleep 100``
    made a container called "sleep" running "100". With no NAME before ``--``, NAME is
    given as empty here and the API generates one (Docker's adjective_surname).
    """

    def parse_args(self, ctx: ClickContext, args: list[str]) -> list[str]:
        if "--" in args:
            cut = args.index("--")
            valued = {
                o for p in self.params if p.param_type_name == "option" and not getattr(p, "is_flag", False) for o in p.opts
            }
            before, i = args[:cut], 0
            positional = False
            while i < len(before):
                word = before[i]
                if word in valued:
                    i += 2
                    continue
                if not word.startswith("-") or word == "-":
                    positional = True
                    break
                i += 1
            if not positional:
                args = [*before, NO_NAME, *args[cut:]]
        return super().parse_args(ctx, args)


def check_run_name(value: str | None) -> str | None:
    """A NAME to check, or none (the API generates one)."""
    return None if value in (None, NO_NAME) else check_name(value)


@app.command(cls=RunCommand)
@handles_api_errors
def run(
    ctx: typer.Context,
    name: Annotated[
        str | None,
        typer.Argument(metavar="[NAME]", help="container name; generated (adjective_surname) if absent", callback=check_run_name),
    ] = None,
    host: Annotated[
        str | None, typer.Option("--host", help="host to place it on (default: fewest containers, ties by name)")
    ] = None,
    ip: Annotated[list[str] | None, typer.Option("--ip", help="public IP (repeatable)")] = None,
    port: Annotated[
        list[str] | None,
        typer.Option("--port", "-p", help="80/tcp (on every --ip) or IP:80/tcp (on that IP); repeatable"),
    ] = None,
    image: Annotated[str | None, typer.Option("--image", help="image (Docker runtime)")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE for the command (repeatable)")] = None,
    restart: Annotated[
        RestartPolicy | None, typer.Option("--restart", help="when the command exits: no (default), on-failure, always")
    ] = None,
    stop_timeout: Annotated[
        int | None, typer.Option("--stop-timeout", min=0, help="seconds from SIGTERM to SIGKILL on stop (default 10)")
    ] = None,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = DEFAULT_WAIT,
    output: OutputOpt = Format.table,
    command: Annotated[list[str] | None, typer.Argument(help="command to run, after --")] = None,
) -> None:
    """Create a container holding public IPs, with its ports mapped: run [NAME] [--host H] --ip IP -p 80/tcp -- CMD...

    With --wait (the default) a container that cannot start is refused and nothing is left;
    one that starts and exits at once is kept (as Docker does) and reported, exit status 1.
    """
    ips, ports = published(ip or [], port or [])
    body: dict[str, Any] = {"name": name, "host": host, "ips": ips, "ports": ports, "command": command or [], "image": image}
    # Only what was given: the API's defaults (restart no, stop timeout 10 s) stay the API's.
    extras = {"env": env, "restart": restart.value if restart else None, "stop_timeout": stop_timeout}
    body.update({k: v for k, v in extras.items() if v is not None})
    result = api_of(ctx).write("POST", "/v1/containers", body, wait=wait, wait_timeout=timeout)
    created = result.get("container") or {}
    if output is Format.json:
        emit_json(result)
    else:
        for note in result.get("notes") or []:
            out().print(note, markup=False, highlight=False, emoji=False)
        render.write(out(), f"{created.get('name', name)} created on {created.get('host', host)}", result)
    status = created.get("status") or {}
    if wait and status.get("state") in ("exited", "error"):
        code = status.get("exit_code")
        how = f"exited at once (exit code {code})" if code is not None else f"is {status.get('state')}"
        raise ApiError(0, "command", f"{created.get('name')} was created but {how}: {status.get('message') or '-'}")


def is_up(c: dict[str, Any]) -> bool:
    """What ``ps`` lists without ``-a``: containers meant to run (an errored one included: it is news)."""
    return bool(c.get("running"))


@app.command()
@handles_api_errors
def ps(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all", "-a", help="Also stopped containers.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Names only, one a line.")] = False,
    output: OutputOpt = Format.table,
) -> None:
    """List containers meant to run (-a: all of them)."""
    items = [c for c in api_of(ctx).get("/v1/containers") if all_ or is_up(c)]
    if quiet:
        for c in items:
            typer.echo(c["name"])
    elif output is Format.json:
        emit_json(items)
    else:
        render.containers(out(), items)


@app.command()
def inspect(
    ctx: typer.Context,
    names: Annotated[
        list[str],
        typer.Argument(metavar="NAME...", help="container names", callback=check_names, autocompletion=complete_names),
    ],
    output: OutputOpt = Format.table,
) -> None:
    """Show containers: IPs, MAC, port block, status, mappings (one name: a JSON object; several: a list)."""
    api = api_of(ctx)
    found: list[Any] = []
    failed = False
    for name in names:
        try:
            found.append(api.get(f"/v1/containers/{quote_segment(name)}"))
        except ApiError as exc:
            typer.echo(f"error: {exc.describe()}", err=True)
            failed = True
            if exc.status in (0, 401):  # the API itself is the problem: the other names would fail the same way
                break
    if output is Format.json:
        if found:
            emit_json(found[0] if len(names) == 1 else found)
    else:
        for i, item in enumerate(found):
            if i:
                out().print()
            render.container(out(), item)
    if failed:
        raise typer.Exit(1)


def _container_write(
    ctx: typer.Context,
    method: str,
    name: str,
    action: str,
    verb: str,
    *,
    wait: bool,
    timeout: float,
    output: Format,
    params: dict[str, str] | None = None,
) -> None:
    path = f"/v1/containers/{quote_segment(name)}{action}"
    result = api_of(ctx).write(method, path, wait=wait, wait_timeout=timeout, params=params)
    emit_json(result) if output is Format.json else render.write(out(), f"{name} {verb}", result)


@app.command()
@handles_api_errors
def stop(
    ctx: typer.Context,
    name: NameArg,
    time_: Annotated[
        int | None,
        typer.Option("--time", "-t", min=0, max=3600, help="seconds from SIGTERM to SIGKILL (default: its --stop-timeout)"),
    ] = None,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = DEFAULT_WAIT,
    output: OutputOpt = Format.table,
) -> None:
    """Stop a container (it keeps its IPs, block and mappings): SIGTERM, then SIGKILL after --time seconds."""
    params = {"time": str(time_)} if time_ is not None else None
    _container_write(ctx, "POST", name, "/stop", "stopped", wait=wait, timeout=timeout, output=output, params=params)


@app.command()
@handles_api_errors
def start(
    ctx: typer.Context, name: NameArg, wait: WaitOpt = True, timeout: TimeoutOpt = DEFAULT_WAIT, output: OutputOpt = Format.table
) -> None:
    """Start a stopped container; exit status 1, with the agent's reason, if it does not run."""
    path = f"/v1/containers/{quote_segment(name)}/start"
    result = api_of(ctx).write("POST", path, wait=wait, wait_timeout=timeout)
    status = (result.get("container") or {}).get("status") or {}
    if wait and status.get("state") != "running":
        # The answer carries the container as its agent reported it at this write: say what really happened.
        state, reason = status.get("state", "unknown"), status.get("message")
        if state == "exited" and status.get("exit_code") is not None:
            raise ApiError(0, "name", f"{name} started but exited at once (exit code {status['exit_code']})")
        raise ApiError(0, "name", f"{name} did not start: {render.state_and_reason(state, reason)}")
    emit_json(result) if output is Format.json else render.write(out(), f"{name} started", result)


@app.command()
@handles_api_errors
def rm(
    ctx: typer.Context,
    name: NameArg,
    force: Annotated[
        bool, typer.Option("--force", "-f", help="accepted for Docker habits: rm always stops a running container first")
    ] = False,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = DEFAULT_WAIT,
    output: OutputOpt = Format.table,
) -> None:
    """Remove a container and its mappings; a running one is stopped first (as docker rm -f)."""
    _container_write(ctx, "DELETE", name, "", "removed", wait=wait, timeout=timeout, output=output)


@app.command()
@handles_api_errors
def logs(
    ctx: typer.Context,
    name: NameArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new output (Ctrl-C to stop).")] = False,
    tail: Annotated[int | None, typer.Option("--tail", "-n", min=0, help="Only the last N lines.")] = None,
) -> None:
    """Print a container's output (what its command wrote to stdout and stderr); -f returns once it has exited."""
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
                if chunk.get("running") is False:  # nothing more will come (an older API does not say: keep following)
                    return
                time.sleep(FOLLOW_PAUSE)
            chunk = api.request("GET", path, params={"offset": str(chunk["offset"])})
    except KeyboardInterrupt:
        return


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


@app.command(cls=RawArgs, add_help_option=False)
def lab(ctx: typer.Context) -> None:
    """Build, inspect, enter and tear down a lab cloud: portmesh lab up|down|status|exec|env|demo (--help for each)."""
    exec_lab(list(ctx.args))


@app.command(cls=RawArgs, add_help_option=False)
def up(ctx: typer.Context) -> None:
    """Start the embedded single-machine deployment: store, controller, agent, API (portmesh lab up)."""
    exec_lab(["up", *ctx.args])


@app.command(cls=RawArgs, add_help_option=False)
def down(ctx: typer.Context) -> None:
    """Stop what `up` started and remove exactly what it made (portmesh lab down)."""
    exec_lab(["down", *ctx.args])


@app.command(cls=RawArgs, add_help_option=False)
def demo(ctx: typer.Context) -> None:
    """Run the demo in a lab (portmesh lab demo)."""
    exec_lab(["demo", *ctx.args])


@app.command("exec", context_settings={"allow_interspersed_args": False})
@handles_api_errors
def exec_(
    ctx: typer.Context,
    name: NameArg,
    command: Annotated[list[str], typer.Argument(help="command to run inside it, after --")],
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="docker's -i: stdin always reaches it")] = False,
    tty: Annotated[bool, typer.Option("--tty", "-t", help="docker's -t: so does the terminal")] = False,
) -> None:
    """Run a command in a container's namespaces, on the machine it runs on: exec [-it] NAME -- CMD..."""
    if command[:1] == ["--"]:  # everything after NAME is the command's; only the first -- is ours
        command = command[1:]
    if not command:
        raise typer.BadParameter("no command given after --", param_hint="'COMMAND'")
    container = api_of(ctx).get(f"/v1/containers/{quote_segment(name)}")
    try:
        p = enter.plan(container)
        sys.stdout.flush()
        sys.stderr.flush()
        enter.exec_argv(p, command)
    except (enter.NotHere, OSError) as exc:
        raise ApiError(0, "name", str(exc)) from None


def main() -> None:
    """Console-script entry point (``portmesh``): no traceback reaches the user, whatever happens."""
    try:
        app()
    except Exception as exc:  # the last line of defence; expected errors are handled where they happen
        typer.echo(f"error: unexpected {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
