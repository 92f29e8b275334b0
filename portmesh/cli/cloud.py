"""The cloud's shape from the command line: ``host add|rm``, ``pool ls|add|rm``, ``config show|set``.

What the CLI can judge itself (a name, an address, a CIDR, an integer, a known key) is a usage
error (exit 2) before any request; what needs the state (overlaps, containers in the way) is the
API's refusal (exit 1, its field and reason on stderr).
"""

from __future__ import annotations

import enum
from ipaddress import IPv4Network
from typing import Annotated, Any

import typer

from portmesh.cli import render
from portmesh.cli.args import valid_name
from portmesh.cli.client import DEFAULT_WAIT, quote_segment
from portmesh.cli.common import Format, OutputOpt, TimeoutOpt, WaitOpt, api_of, emit_json, handles_api_errors, out
from portmesh.model.errors import InvalidInput
from portmesh.model.validation import parse_ip

host_app = typer.Typer(help="Hosts: add one (its role and underlay address) or remove one. List them: portmesh hosts.")
pool_app = typer.Typer(help="Public pools: the IPv4 blocks containers' public IPs come from.", no_args_is_help=True)
config_app = typer.Typer(help="The cloud's network configuration (in the store).", no_args_is_help=True)
host_app.info.no_args_is_help = True


def register(app: typer.Typer) -> None:
    """Add the groups to ``portmesh``."""
    app.add_typer(host_app, name="host")
    app.add_typer(pool_app, name="pool")
    app.add_typer(config_app, name="config")


class Role(enum.StrEnum):
    gateway = "gateway"
    compute = "compute"


def check_ip(value: str, hint: str) -> str:
    try:
        parse_ip(value)
    except InvalidInput as exc:
        raise typer.BadParameter(exc.reason, param_hint=hint) from None
    return value


def check_cidr(value: str, hint: str = "'CIDR'") -> IPv4Network:
    """An IPv4 network without host bits (``203.0.113.0/24``), or a usage error naming ``hint``."""
    if "/" not in value:
        raise typer.BadParameter(f"{value!r} is not a network in CIDR notation (e.g. 203.0.113.0/24)", param_hint=hint)
    try:
        return IPv4Network(value, strict=True)
    except ValueError as exc:
        raise typer.BadParameter(f"{value!r}: {exc}", param_hint=hint) from None


# --- hosts ---


@host_app.command("add")
@handles_api_errors
def host_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="host name (as its agent's --host)")],
    underlay_ip: Annotated[str, typer.Option("--underlay-ip", help="where the other hosts' tunnels end")],
    role: Annotated[
        Role | None, typer.Option("--role", help="gateway or compute (default: gateway if there is none yet)")
    ] = None,
    datapath_id: Annotated[
        int | None, typer.Option("--datapath-id", min=1, max=2**53 - 1, help="its bridge's OpenFlow datapath id")
    ] = None,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = DEFAULT_WAIT,
    output: OutputOpt = Format.table,
) -> None:
    """Register a host: host add NAME --underlay-ip IP [--role gateway|compute] [--datapath-id N]."""
    body: dict[str, Any] = {"name": valid_name(name, "'NAME'"), "underlay_ip": check_ip(underlay_ip, "'--underlay-ip'")}
    if role is not None:
        body["role"] = role.value
    if datapath_id is not None:
        body["datapath_id"] = datapath_id
    result = api_of(ctx).write("POST", "/v1/hosts", body, wait=wait, wait_timeout=timeout)
    h = result["host"]
    what = f"host {h['name']} added as {h.get('role', '?')} (underlay {h.get('underlay_ip') or '-'})"
    emit_json(result) if output is Format.json else render.write(out(), what, result)


@host_app.command("rm")
@handles_api_errors
def host_rm(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="host name")],
    wait: WaitOpt = True,
    timeout: TimeoutOpt = DEFAULT_WAIT,
    output: OutputOpt = Format.table,
) -> None:
    """Remove a host that holds no container; the others drop their tunnel to it."""
    path = "/v1/hosts/" + quote_segment(valid_name(name, "'NAME'"))
    result = api_of(ctx).write("DELETE", path, wait=wait, wait_timeout=timeout)
    emit_json(result) if output is Format.json else render.write(out(), f"host {name} removed", result)


# --- pools ---


@pool_app.command("ls")
@handles_api_errors
def pool_ls(ctx: typer.Context, output: OutputOpt = Format.table) -> None:
    """List the public pools and how many of their addresses containers hold."""
    items = api_of(ctx).get("/v1/pools")
    emit_json(items) if output is Format.json else render.pools(out(), items)


@pool_app.command("add")
@handles_api_errors
def pool_add(
    ctx: typer.Context,
    cidr: Annotated[str, typer.Argument(metavar="CIDR", help="e.g. 198.51.100.0/24")],
    wait: WaitOpt = True,
    timeout: TimeoutOpt = DEFAULT_WAIT,
    output: OutputOpt = Format.table,
) -> None:
    """Add a public pool (a block routed to the gateway hosts)."""
    pool = check_cidr(cidr)
    result = api_of(ctx).write("POST", "/v1/pools", {"pool": str(pool)}, wait=wait, wait_timeout=timeout)
    emit_json(result) if output is Format.json else render.write(out(), f"pool {pool} added", result)


@pool_app.command("rm")
@handles_api_errors
def pool_rm(
    ctx: typer.Context,
    cidr: Annotated[str, typer.Argument(metavar="CIDR", help="a pool, as pool ls lists it")],
    wait: WaitOpt = True,
    timeout: TimeoutOpt = DEFAULT_WAIT,
    output: OutputOpt = Format.table,
) -> None:
    """Remove a public pool no container holds an IP of."""
    pool = check_cidr(cidr)
    path = f"/v1/pools/{pool.network_address}/{pool.prefixlen}"
    result = api_of(ctx).write("DELETE", path, wait=wait, wait_timeout=timeout)
    emit_json(result) if output is Format.json else render.write(out(), f"pool {pool} removed", result)


# --- config ---

INT_KEYS = {"block_size": (64, 32768), "container_mtu": (576, 9000), "vxlan_vni": (1, 2**24 - 1), "vxlan_port": (1, 65535)}
KEYS = ("gateway_ip", *INT_KEYS, "protected_networks")


def config_value(key: str, value: str) -> tuple[str, Any]:
    """``KEY VALUE`` as the API's PATCH body takes it (``gateway-ip`` spells ``gateway_ip`` too)."""
    field = key.replace("-", "_")
    if field == "public_pools":
        raise typer.BadParameter("public pools are set with `portmesh pool add|rm`", param_hint="'KEY'")
    if field not in KEYS:
        raise typer.BadParameter(f"{key!r} is not one of {', '.join(KEYS)}", param_hint="'KEY'")
    if field in INT_KEYS:
        low, high = INT_KEYS[field]
        if not value.isascii() or not value.isdigit() or not low <= int(value) <= high:
            raise typer.BadParameter(f"{field} takes an integer from {low} to {high}, not {value!r}", param_hint="'VALUE'")
        return field, int(value)
    if field == "gateway_ip":
        return field, check_ip(value, "'VALUE'")
    nets = [str(check_cidr(v.strip(), "'VALUE'")) for v in value.split(",") if v.strip()]
    if not nets:
        raise typer.BadParameter("protected_networks takes CIDRs separated by commas", param_hint="'VALUE'")
    return field, nets


@config_app.command("show")
@handles_api_errors
def config_show(ctx: typer.Context, output: OutputOpt = Format.table) -> None:
    """Show the configuration every component reads from the store."""
    config = api_of(ctx).get("/v1/config")
    emit_json(config) if output is Format.json else render.config(out(), config)


@config_app.command("set")
@handles_api_errors
def config_set(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(metavar="KEY", help=", ".join(KEYS))],
    value: Annotated[str, typer.Argument(metavar="VALUE", help="protected_networks: CIDRs separated by commas")],
    wait: WaitOpt = True,
    timeout: TimeoutOpt = DEFAULT_WAIT,
    output: OutputOpt = Format.table,
) -> None:
    """Set one configuration value (refused while containers exist: they are plumbed with the old one)."""
    field, parsed = config_value(key, value)
    result = api_of(ctx).write("PATCH", "/v1/config", {field: parsed}, wait=wait, wait_timeout=timeout)
    shown = ",".join(parsed) if isinstance(parsed, list) else parsed
    emit_json(result) if output is Format.json else render.write(out(), f"{field} = {shown}", result)
