"""portmesh lab: build, inspect, enter and remove a lab cloud on this machine.

Reached as ``portmesh lab ...`` (the outer CLI hands its arguments over exactly as typed)
or ``python -m portmesh.lab ...``. Errors are one line on stderr: a bad lab name or a
missing command is a usage error (exit 2), anything else exit 1; never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from portmesh.lab import faults, node, services
from portmesh.lab.datapaths import DATAPATHS, parse_datapaths
from portmesh.lab.network import Lab
from portmesh.lab.state import LAB_NAME_RE, LabState
from portmesh.model.validation import NAME_RE

PROG = "portmesh lab"
HELP = "Build, inspect, enter and remove a lab cloud on this machine (namespaces, OVS, the portmesh components)."

app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP, pretty_exceptions_enable=False, rich_markup_mode=None)


HostArg = Annotated[str, typer.Argument(metavar="HOST", help="a lab host (h1, h2...)")]


def check_lab_name(value: str) -> str:
    """A lab name that can prefix namespace and interface names (checked before anything is touched)."""
    if not LAB_NAME_RE.fullmatch(value):
        raise typer.BadParameter(f"{value!r} is not a lab name (lowercase letters, digits and '-', at most 16 characters)")
    return value


NameOpt = Annotated[str, typer.Option("--name", "-n", help="lab name (namespaces are pm-<name>-*)", callback=check_lab_name)]


def _need_root() -> None:
    if os.geteuid() != 0:
        typer.echo("the lab makes namespaces and runs OVS: run it as root", err=True)
        raise typer.Exit(2)


@app.command()
def up(
    hosts: Annotated[int, typer.Option(min=1, max=50, help="number of hosts")] = 1,
    name: NameOpt = "lab",
    tune_rmem: Annotated[bool, typer.Option(help="raise net.core.rmem_default to 4 MiB while up")] = True,
    ha: Annotated[bool, typer.Option("--ha", help="a 3-member Raft store (store-1..3) and two controllers")] = False,
    datapath: Annotated[
        str, typer.Option(help="what forwards on the hosts: ovs, ebpf, or per host h1=ovs,h2=ebpf (others ovs)")
    ] = "ovs",
) -> None:
    """Build the lab: namespaces, links, one OVS per host, store, controller, agents, API.

    With --ha the store is a 3-member Raft cluster made with the store's own create-cluster and
    join-cluster commands (clients on 198.18.0.1:6641-6643, Raft on 6644-6646) and two
    controllers run (controller-1 on 198.18.0.1:6653, controller-2 on 6654).

    With --datapath ebpf a host runs no OVS: its agent loads the eBPF datapath (tc programs on
    its ports, maps filled from the same desired state); a mixed cloud is fine.
    """
    _need_root()
    try:
        parse_datapaths(datapath, [f"h{i}" for i in range(1, hosts + 1)])
    except ValueError as exc:
        typer.echo(f"lab up: --{exc}", err=True)
        raise typer.Exit(2) from None
    try:
        with progress(f"lab {name}: starting") as say:
            state = Lab(name, say=say).up(hosts, tune_rmem=tune_rmem, ha=ha, datapath=datapath)
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
    with console.status(Text(first)) as spinner:

        def say(msg: str) -> None:
            console.print(f"[{time.monotonic() - start:5.1f}s] {msg}", markup=False)
            spinner.update(Text(f"{msg} ..."))

        yield say


@app.command()
def demo(
    name: NameOpt = "lab",
    datapath: Annotated[
        str, typer.Option(help="what forwards on the hosts: ovs, ebpf, or per host h1=ovs,h2=ebpf (others ovs)")
    ] = "ovs",
) -> None:
    """Lab up, sample containers sharing public IPs, and a real outside client reaching each mapping."""
    _need_root()
    from portmesh.lab.demo import run_demo

    try:
        parse_datapaths(datapath, [f"h{i}" for i in range(1, 4)])
    except ValueError as exc:
        typer.echo(f"demo: --{exc}", err=True)
        raise typer.Exit(2) from None
    try:
        run_demo(name, datapath=datapath)
    except Exception as exc:
        typer.echo(f"demo failed: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def down(name: NameOpt = "lab") -> None:
    """Remove exactly what `up` recorded and put machine-wide settings back."""
    _need_root()
    if Lab(name).down():
        raise typer.Exit(1)


@app.command("add-host")
def add_host(
    name: NameOpt = "lab",
    datapath: Annotated[
        str | None, typer.Option(help="ovs or ebpf (default: the lab's, when all its hosts run the same one; else ovs)")
    ] = None,
) -> None:
    """Add a compute host to a running lab as a real one joins: links, datapath, `host add`, its agent (prints its name)."""
    _need_root()
    _state(name)
    if datapath is not None and datapath not in DATAPATHS:
        typer.echo(f"lab add-host: --datapath {datapath!r}: expected {' or '.join(DATAPATHS)}", err=True)
        raise typer.Exit(2)
    try:
        with progress(f"lab {name}: adding a host") as say:
            host = Lab(name, say=say).add_host(datapath)
    except Exception as exc:
        typer.echo(f"lab add-host failed: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(host)


@app.command("rm-host")
def rm_host(
    host: Annotated[str, typer.Argument(metavar="HOST", help="a lab host other than h1 (the gateway host)")],
    name: NameOpt = "lab",
) -> None:
    """Take a host out of a running lab (`host rm`, its daemons stopped) and remove what the lab made for it."""
    _need_root()
    state = _state(name)
    if host not in state.hosts:
        typer.echo(f"error: HOST: lab {name} has no host {host!r} (hosts: {', '.join(state.hosts)})", err=True)
        raise typer.Exit(1)
    try:
        problems = Lab(name, say=lambda msg: typer.echo(msg, err=True)).remove_host(host)
    except ValueError as exc:
        typer.echo(f"error: HOST: {exc}", err=True)
        raise typer.Exit(1) from None
    if problems:
        raise typer.Exit(1)


@app.command()
def status(name: NameOpt = "lab") -> None:
    """Show what the lab recorded and whether it is still alive (JSON)."""
    typer.echo(json.dumps(Lab(name).status(), indent=2))


def _state(name: str) -> LabState:
    state = Lab(name).state()
    if state is None:
        typer.echo(f"error: --name: lab {name} is not up", err=True)
        raise typer.Exit(1)
    return state


@app.command()
def env(name: NameOpt = "lab") -> None:
    """Print the exports that point the portmesh CLI at this lab: eval "$(portmesh lab env --name N)"."""
    state = _state(name)
    if not state.api_url:
        typer.echo(f"error: --name: lab {name} has no API (it did not come up completely)", err=True)
        raise typer.Exit(1)
    typer.echo(f"export PORTMESH_API={shlex.quote(state.api_url)}")
    typer.echo(f"export PORTMESH_TOKEN_FILE={shlex.quote(str(services.token_file(state.dir)))}")


@app.command("exec")
def exec_(
    target: Annotated[str, typer.Argument(metavar="NODE", help="inet, mgmt, h1... or a container name")],
    command: Annotated[list[str], typer.Argument(metavar="-- COMMAND...", help="command to run there, after --")],
    name: NameOpt = "lab",
) -> None:
    """Run a command in a lab node's network namespace, or in a container's namespaces (as portmesh exec).

    Everything after -- is the command's, exactly as typed: exec inet -- ping -n -c 1 203.0.113.10.
    """
    _need_root()
    state = _state(name)
    sys.stdout.flush()
    sys.stderr.flush()
    if state.ns(target) not in state.namespaces:
        # Not a node: a container, entered by the CLI's exec with this lab's API (all its namespaces, not just net).
        nodes = ", ".join(ns.removeprefix(state.prefix) for ns in state.namespaces)
        if not state.api_url or not NAME_RE.fullmatch(target):
            typer.echo(f"error: NODE: {target!r} is not a node of lab {name} ({nodes}) nor a container name", err=True)
            raise typer.Exit(1)
        argv = [sys.executable, "-m", "portmesh.cli", "--api", state.api_url]
        argv += ["--token-file", str(services.token_file(state.dir)), "exec", target, "--", *command]
        os.execv(sys.executable, argv)
    try:
        node.exec_in(state.ns(target), command)
    except FileNotFoundError:
        typer.echo(f"error: command: {command[0]!r} not found in {target}", err=True)
        raise typer.Exit(127) from None
    except OSError as exc:
        typer.echo(f"error: command: cannot run {command[0]!r} in {target}: {exc.strerror or exc}", err=True)
        raise typer.Exit(126) from None


fault_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Inject a fault into a running lab and restart what was killed (by recorded PID), saying how long recovery took.",
)
app.add_typer(fault_app, name="fault")

JsonOpt = Annotated[bool, typer.Option("--json", help="print the report as JSON")]


def _fault(run: Callable[[], faults.FaultReport], as_json: bool) -> None:
    """Run a fault and print its report; a fault that cannot be done is one line on stderr and exit 1."""
    _need_root()
    try:
        report = run()
    except (faults.FaultError, LookupError, ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for line in report.lines():
            typer.echo(line)


@fault_app.command("kill-controller")
def fault_kill_controller(
    name: NameOpt = "lab",
    sig: Annotated[str, typer.Option("--signal", help="KILL (a crash) or TERM (a graceful stop)")] = "KILL",
    which: Annotated[str, typer.Option("--which", help="with --ha: master, standby, 1 or 2")] = "master",
    as_json: JsonOpt = False,
) -> None:
    """Kill the controller, start it again, and wait until every switch has reconnected (flow-mods counted).

    On a lab up --ha, kill the --which one (default the master, read from the controllers'
    logs): for a master, how long until the other one became master; then restart it.
    """
    if sig.upper().removeprefix("SIG") not in ("KILL", "TERM"):
        typer.echo(f"error: --signal: {sig!r} is neither KILL nor TERM", err=True)
        raise typer.Exit(2)
    if which not in ("master", "standby") and not which.isdigit():
        typer.echo(f"error: --which: {which!r} is not master, standby or a controller number", err=True)
        raise typer.Exit(2)
    chosen = signal.Signals["SIG" + sig.upper().removeprefix("SIG")]
    _fault(lambda: faults.kill_controller(Lab(name), chosen, which=which), as_json)


@fault_app.command("restart-switch")
def fault_restart_switch(
    host: HostArg,
    name: NameOpt = "lab",
    as_json: JsonOpt = False,
) -> None:
    """Kill a host's ovs-vswitchd (as a crash), start it again, and wait until the controller re-installed its flows."""
    _fault(lambda: faults.restart_switch(Lab(name), host), as_json)


@fault_app.command("kill-agent")
def fault_kill_agent(
    host: HostArg,
    name: NameOpt = "lab",
    as_json: JsonOpt = False,
) -> None:
    """Kill a host's agent (SIGKILL), start it again, and wait until it has started."""
    _fault(lambda: faults.kill_agent(Lab(name), host), as_json)


@fault_app.command("freeze-switch")
def fault_freeze_switch(
    host: HostArg,
    name: NameOpt = "lab",
    seconds: Annotated[float, typer.Option("--seconds", min=0.1, help="thaw it after this long at the latest")] = 30.0,
    as_json: JsonOpt = False,
) -> None:
    """Freeze a host's ovs-vswitchd (SIGSTOP) until the controller drops it by echo (or --seconds), then thaw it.

    Reports how long the controller took to notice (no TCP error comes from a frozen switch: only
    its echo requests find it) and how long until the switch was reconnected and programmed again.
    """
    _fault(lambda: faults.freeze_switch(Lab(name), host, seconds), as_json)


@fault_app.command("kill-store-member")
def fault_kill_store_member(
    member: Annotated[str, typer.Argument(metavar="N", help="a store member: 1, 2, 3, or leader (lab up --ha)")],
    name: NameOpt = "lab",
    as_json: JsonOpt = False,
) -> None:
    """Kill -9 store member N (or the current leader) of a lab up --ha, time until the API accepts a write
    again, restart it and wait until it has rejoined the cluster. A standalone store says so and exits 1."""
    if member != "leader" and not member.isdigit():
        typer.echo(f"error: N: {member!r} is not a member number (1..3) nor 'leader'", err=True)
        raise typer.Exit(2)
    _fault(lambda: faults.kill_store_member(Lab(name), member), as_json)


def main() -> None:
    """Entry point: no traceback reaches the user; an unexpected failure is one line and exit 1."""
    try:
        app(prog_name=PROG)
    except Exception as exc:  # the last line of defence; expected errors are handled where they happen
        typer.echo(f"error: unexpected {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
