"""``portmesh map``: mappings, their backends (load balancing), firewall policy and health check.

Everything typed is checked here with the model's own parsers before a request is sent, and a
usage error names the option (exit 2): a bad ``--allow`` entry, a ``--weight`` for a container
that is not a backend, a ``--health-interval`` without ``--health``. What only the API can judge
(a container that does not exist or does not hold the IP, the last backend) comes back as the
API's refusal, printed as ``error: <field>: <reason>`` (exit 1).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import typer

from portmesh.cli import render
from portmesh.cli.args import mapping_target, valid_name
from portmesh.cli.client import DEFAULT_WAIT, quote_segment
from portmesh.cli.common import Format, OutputOpt, TimeoutOpt, WaitOpt, api_of, emit_json, handles_api_errors, out
from portmesh.model.errors import InvalidInput
from portmesh.model.validation import parse_health, parse_networks, parse_weight

map_app = typer.Typer(
    help="Mappings: (public IP, port/proto) -> one container or several (load balanced), with a firewall policy.",
    no_args_is_help=True,
)
backend_app = typer.Typer(help="Add or remove one backend of an existing mapping.", no_args_is_help=True)
map_app.add_typer(backend_app, name="backend")

TARGET = "IP:PORT/PROTO | IP PORT/PROTO"

AllowOpt = Annotated[
    list[str] | None,
    typer.Option("--allow", metavar="CIDR", help="Only these source networks may connect (repeat; default: everyone)."),
]
DenyOpt = Annotated[
    list[str] | None,
    typer.Option("--deny", metavar="CIDR", help="These source networks may not connect (repeat; wins over --allow)."),
]


def register(app: typer.Typer) -> None:
    """Add ``map`` to ``portmesh``."""
    app.add_typer(map_app, name="map")


# A mapping named as IP:PORT/PROTO, or as IP and PORT/PROTO (every command that takes one mapping).
TargetIpArg = Annotated[str, typer.Argument(metavar="IP[:PORT/PROTO]", help="public IP, or IP:PORT/PROTO")]
TargetPortArg = Annotated[str | None, typer.Argument(metavar="[PORT/PROTO]", help="PORT/PROTO, e.g. 80/tcp")]


def split_target(args: list[str], names: str) -> tuple[str, dict[str, Any], list[str]]:
    """``IP:PORT/PROTO NAME...`` or ``IP PORT/PROTO NAME...``: the key and the names after it."""
    if not args:
        raise typer.BadParameter(f"expected {TARGET} {names}", param_hint="'ARGS'")
    if ":" in args[0] or args[0].count(".") != 3:  # IP:PORT/PROTO, or a port without its IP (said so)
        ip, spec = mapping_target(args[0], None)
        rest = args[1:]
    else:
        if len(args) < 2:
            raise typer.BadParameter(f"expected {TARGET} {names}, got {len(args)} argument(s)", param_hint="'ARGS'")
        ip, spec = mapping_target(args[0], args[1])
        rest = args[2:]
    return ip, spec, rest


def key_path(ip: str, spec: dict[str, Any]) -> str:
    return f"/v1/mappings/{quote_segment(ip)}/{quote_segment(spec['proto'])}/{spec['port']}"


def networks(values: list[str] | None, option: str) -> list[str] | None:
    """``--allow``/``--deny`` checked as the API will (host bits, bad octets), naming the option."""
    if values is None:
        return None
    try:
        return [str(n) for n in parse_networks(values, option.lstrip("-"))]
    except InvalidInput as exc:
        raise typer.BadParameter(exc.reason, param_hint=f"'{option}'") from None


def weights(values: list[str], names: list[str], hint: str = "'--weight'") -> dict[str, int]:
    """``--weight NAME=N``: NAME one of the backends given, N a whole number in 1-100."""
    out: dict[str, int] = {}
    for value in values:
        name, sep, number = value.partition("=")
        if not sep or not re.fullmatch(r"[0-9]{1,3}", number):
            raise typer.BadParameter(f"{value!r}: expected NAME=N (e.g. web-c=2)", param_hint=hint)
        if name not in names:
            raise typer.BadParameter(f"{name!r} is not one of the backends named ({', '.join(names)})", param_hint=hint)
        try:
            out[name] = parse_weight(int(number))
        except InvalidInput as exc:
            raise typer.BadParameter(f"{value!r}: {exc.reason}", param_hint=hint) from None
    return out


HEALTH_OPTION = {"kind": "--health", "path": "--health", "expect": "--health", "port": "--health-port"}


def health(spec: str | None, port: int | None, interval: float | None, timeout: float | None, threshold: int | None) -> Any:
    """``tcp`` or ``http[:PATH[=STATUS]]`` and its options as the API's ``health`` object, checked."""
    extra = {"port": port, "interval": interval, "timeout": timeout, "threshold": threshold}
    if spec is None:
        given = [name for name, value in extra.items() if value is not None]
        if given:
            raise typer.BadParameter(
                f"--health-{given[0]} needs --health tcp|http[:PATH[=STATUS]]", param_hint=f"'--health-{given[0]}'"
            )
        return None
    kind, _, rest = spec.partition(":")
    body: dict[str, Any] = {"kind": kind}
    if rest:
        if kind != "http":
            raise typer.BadParameter(f"{spec!r}: only http takes :PATH[=STATUS]", param_hint="'--health'")
        path, sep, status = rest.rpartition("=") if re.search(r"=[0-9]+$", rest) else (rest, "", "")
        body["path"] = path
        if sep:
            body["expect"] = int(status)
    body |= {name: value for name, value in extra.items() if value is not None}
    try:
        parse_health(**body)
    except InvalidInput as exc:
        part = exc.field.rpartition(".")[2] if exc.field else "kind"
        raise typer.BadParameter(
            f"{spec!r}: {exc.reason}", param_hint=f"'{HEALTH_OPTION.get(part, f'--health-{part}')}'"
        ) from None
    return body


HealthOpt = Annotated[
    str | None,
    typer.Option("--health", metavar="tcp|http[:PATH[=STATUS]]", help="Check each backend: TCP connect or HTTP GET."),
]
HealthPortOpt = Annotated[int | None, typer.Option("--health-port", help="Port checked (default: the mapping's).")]
HealthIntervalOpt = Annotated[float | None, typer.Option("--health-interval", help="Seconds between checks (2).")]
HealthTimeoutOpt = Annotated[float | None, typer.Option("--health-timeout", help="Seconds a check may take (1).")]
HealthThresholdOpt = Annotated[
    int | None, typer.Option("--health-threshold", help="Checks in a row that mark a backend down, or up again (2).")
]


def _written(result: Any, what: str, output: Format) -> None:
    emit_json(result) if output is Format.json else render.write(out(), what, result)


@map_app.command("add")
@handles_api_errors
def map_add(
    ctx: typer.Context,
    args: Annotated[list[str], typer.Argument(metavar=f"{TARGET} NAME...", help="what to map, and the container(s) behind it")],
    weight: Annotated[
        list[str] | None, typer.Option("--weight", metavar="NAME=N", help="A backend's share of new connections (default 1).")
    ] = None,
    allow: AllowOpt = None,
    deny: DenyOpt = None,
    health_spec: HealthOpt = None,
    health_port: HealthPortOpt = None,
    health_interval: HealthIntervalOpt = None,
    health_timeout: HealthTimeoutOpt = None,
    health_threshold: HealthThresholdOpt = None,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = DEFAULT_WAIT,
    output: OutputOpt = Format.table,
) -> None:
    """Map IP:PORT/PROTO (or IP PORT/PROTO) to container NAME, or to several: new connections are spread
    over them by weight, each stays on its backend, and replies go straight back (no NAT)."""
    ip, spec, names = split_target(args, "NAME...")
    if not names:
        raise typer.BadParameter(f"expected {TARGET} NAME..., got no NAME", param_hint="'NAME'")
    names = [valid_name(n, "'NAME'") for n in names]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise typer.BadParameter(f"{twice[0]!r} is named twice", param_hint="'NAME'")
    body: dict[str, Any] = {"public_ip": ip, **spec}
    body |= {"container": names[0]} if len(names) == 1 else {"backends": names}
    if weight:
        body["weights"] = weights(weight, names)
    for key, value in (("allow", networks(allow, "--allow")), ("deny", networks(deny, "--deny"))):
        if value:
            body[key] = value
    check = health(health_spec, health_port, health_interval, health_timeout, health_threshold)
    if check is not None:
        body["health"] = check
    result = api_of(ctx).write("POST", "/v1/mappings", body, wait=wait, wait_timeout=timeout)
    _written_backends(result, output)


@map_app.command("ls")
@handles_api_errors
def map_ls(ctx: typer.Context, output: OutputOpt = Format.table) -> None:
    """List mappings: every backend (weight if not 1, health if checked) and the policy."""
    items = api_of(ctx).get("/v1/mappings")
    emit_json(items) if output is Format.json else render.mappings(out(), items)


@map_app.command("inspect")
@handles_api_errors
def map_inspect(
    ctx: typer.Context,
    ip: TargetIpArg,
    port: TargetPortArg = None,
    output: OutputOpt = Format.table,
) -> None:
    """Show one mapping: backends with weight and health, policy, health check, allowed/denied counters."""
    ip, spec = mapping_target(ip, port)
    m = api_of(ctx).get(key_path(ip, spec))
    emit_json(m) if output is Format.json else render.mapping(out(), m)


@map_app.command("rm")
@handles_api_errors
def map_rm(
    ctx: typer.Context,
    ip: TargetIpArg,
    port: TargetPortArg = None,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = DEFAULT_WAIT,
    output: OutputOpt = Format.table,
) -> None:
    """Remove the mapping of IP:PORT/PROTO (or IP PORT/PROTO), every backend of it."""
    ip, spec = mapping_target(ip, port)
    result = api_of(ctx).write("DELETE", key_path(ip, spec), wait=wait, wait_timeout=timeout)
    _written(result, f"{ip}:{spec['port']}/{spec['proto']} unmapped", output)


@map_app.command("policy")
@handles_api_errors
def map_policy(
    ctx: typer.Context,
    ip: TargetIpArg,
    port: TargetPortArg = None,
    allow: AllowOpt = None,
    deny: DenyOpt = None,
    clear: Annotated[bool, typer.Option("--clear", help="Drop both lists first (open to all unless --allow/--deny).")] = False,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = DEFAULT_WAIT,
    output: OutputOpt = Format.table,
) -> None:
    """Set who may connect: --allow and --deny replace that list (the other is kept unless --clear).
    A change is atomic on each switch and applies to new connections."""
    ip, spec = mapping_target(ip, port)
    body: dict[str, Any] = {"allow": [], "deny": []} if clear else {}
    for key, value in (("allow", networks(allow, "--allow")), ("deny", networks(deny, "--deny"))):
        if value is not None:
            body[key] = value
    if not body:
        raise typer.BadParameter("give --allow CIDR, --deny CIDR or --clear", param_hint="'--allow' / '--deny' / '--clear'")
    result = api_of(ctx).write("PATCH", key_path(ip, spec), body, wait=wait, wait_timeout=timeout)
    m = result["mapping"]
    _written(result, f"{m['public_ip']}:{m['port']}/{m['proto']}: {render.policy(m)}", output)


@map_app.command("health")
@handles_api_errors
def map_health(
    ctx: typer.Context,
    ip: TargetIpArg,
    port: TargetPortArg = None,
    health_spec: HealthOpt = None,
    health_port: HealthPortOpt = None,
    health_interval: HealthIntervalOpt = None,
    health_timeout: HealthTimeoutOpt = None,
    health_threshold: HealthThresholdOpt = None,
    none: Annotated[bool, typer.Option("--none", help="Remove the check: every backend takes connections.")] = False,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = DEFAULT_WAIT,
    output: OutputOpt = Format.table,
) -> None:
    """Set (--health ...) or remove (--none) a mapping's health check; a backend whose check fails
    gets no new connections within interval x threshold, and gets them again once healthy."""
    ip, spec = mapping_target(ip, port)
    check = health(health_spec, health_port, health_interval, health_timeout, health_threshold)
    if (check is None) == (not none):
        raise typer.BadParameter("give either --health tcp|http[:PATH[=STATUS]] or --none", param_hint="'--health' / '--none'")
    result = api_of(ctx).write("PATCH", key_path(ip, spec), {"health": check}, wait=wait, wait_timeout=timeout)
    m = result["mapping"]
    _written(result, f"{m['public_ip']}:{m['port']}/{m['proto']}: health check {render.health_check(m.get('health'))}", output)


def _target_and_name(args: list[str]) -> tuple[str, dict[str, Any], str]:
    """``TARGET NAME`` (the mapping, then one container name): usage errors name the argument."""
    ip, spec, names = split_target(args, "NAME")
    if len(names) != 1:
        raise typer.BadParameter(f"expected {TARGET} NAME, got {len(names)} name(s)", param_hint="'NAME'")
    return ip, spec, valid_name(names[0], "'NAME'")


def _written_backends(result: Any, output: Format) -> None:
    """A mapping write's answer, shown as the mapping and its backends."""
    m = result["mapping"]
    _written(result, f"{m['public_ip']}:{m['port']}/{m['proto']} -> {render.backends(m)}", output)


@backend_app.command("add")
@handles_api_errors
def backend_add(
    ctx: typer.Context,
    args: Annotated[list[str], typer.Argument(metavar=f"{TARGET} NAME", help="the mapping, and the container to add")],
    weight: Annotated[int, typer.Option("--weight", min=1, max=100, help="Its share of new connections.")] = 1,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = DEFAULT_WAIT,
    output: OutputOpt = Format.table,
) -> None:
    """Add backend NAME to a mapping: it takes new connections; connections on the others stay put."""
    ip, spec, name = _target_and_name(args)
    body = {"container": name, "weight": weight}
    result = api_of(ctx).write("POST", key_path(ip, spec) + "/backends", body, wait=wait, wait_timeout=timeout)
    _written_backends(result, output)


@backend_app.command("rm")
@handles_api_errors
def backend_rm(
    ctx: typer.Context,
    args: Annotated[list[str], typer.Argument(metavar=f"{TARGET} NAME", help="the mapping, and the backend to remove")],
    wait: WaitOpt = True,
    timeout: TimeoutOpt = DEFAULT_WAIT,
    output: OutputOpt = Format.table,
) -> None:
    """Remove backend NAME from a mapping (not the last one: `map rm` the mapping). It gets no new connections."""
    ip, spec, name = _target_and_name(args)
    path = f"{key_path(ip, spec)}/backends/{quote_segment(name)}"
    result = api_of(ctx).write("DELETE", path, wait=wait, wait_timeout=timeout)
    _written_backends(result, output)


@backend_app.command("weight")
@handles_api_errors
def backend_weight(
    ctx: typer.Context,
    args: Annotated[list[str], typer.Argument(metavar=f"{TARGET} NAME N", help="the mapping, a backend and its new weight")],
    wait: WaitOpt = True,
    timeout: TimeoutOpt = DEFAULT_WAIT,
    output: OutputOpt = Format.table,
) -> None:
    """Set backend NAME's weight (1-100): its share of new connections; existing ones stay where they are."""
    ip, spec, rest = split_target(args, "NAME N")
    if len(rest) != 2:
        raise typer.BadParameter(
            f"expected {TARGET} NAME N, got {len(rest)} argument(s) after the mapping", param_hint="'NAME N'"
        )
    name = valid_name(rest[0], "'NAME'")
    number = weights([f"{name}={rest[1]}"], [name], "'N'")[name]
    body = {"weights": {name: number}}
    result = api_of(ctx).write("PATCH", key_path(ip, spec), body, wait=wait, wait_timeout=timeout)
    _written_backends(result, output)
