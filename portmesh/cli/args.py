"""What the user typed, turned into what the API takes: checked here, with the model's own rules.

A bad name, port or IP is a usage error (exit 2) naming the option or argument, raised
before any URL is built or any request is sent: ``.`` and ``..`` never reach a path, and
nothing changes. Docker's spellings are accepted: ``-p IP:PORT/PROTO`` besides
``-p PORT/PROTO`` with ``--ip``, and ``map add IP:PORT/PROTO NAME`` besides ``IP PORT/PROTO NAME``.
"""

from __future__ import annotations

from typing import Any

import typer

from portmesh.model.errors import InvalidInput
from portmesh.model.validation import parse_ip, parse_name, parse_port, parse_proto

PORT_HINT = "'--port' / '-p'"


def parse_port_spec(value: str, hint: str = PORT_HINT) -> dict[str, Any]:
    """``80/tcp``, ``53/udp`` or ``80`` (TCP), checked with the model's rules before anything is sent."""
    port, _, proto = value.partition("/")
    try:
        return {"port": parse_port(port), "proto": parse_proto(proto or "tcp").value}
    except InvalidInput as exc:
        reason = f"{value!r}: {exc.reason} (expected PORT or PORT/PROTO, e.g. 80/tcp)"
        raise typer.BadParameter(reason, param_hint=hint) from None


def parse_published(value: str, hint: str = PORT_HINT) -> tuple[str | None, dict[str, Any]]:
    """Docker's ``-p``: ``PORT[/PROTO]`` (on every ``--ip``) or ``IP:PORT[/PROTO]`` (on that IP)."""
    ip, sep, spec = value.rpartition(":")
    if not sep:
        return None, parse_port_spec(value, hint)
    try:
        parse_ip(ip)
    except InvalidInput as exc:
        reason = f"{value!r}: {exc.reason} (expected IP:PORT/PROTO, e.g. 203.0.113.10:80/tcp)"
        raise typer.BadParameter(reason, param_hint=hint) from None
    return ip, parse_port_spec(spec, hint)


def valid_name(value: str, hint: str | None = None) -> str:
    """A container name by the model's rule, so ``.``, ``..`` or ``a/b`` never become part of a URL."""
    try:
        return parse_name(value)
    except InvalidInput as exc:
        raise typer.BadParameter(exc.reason, param_hint=hint) from None


def check_name(value: str) -> str:
    """``valid_name`` as a typer callback (typer names the argument)."""
    return valid_name(value)


def published(ips: list[str], specs: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """``--ip`` and ``-p`` as the API takes them: the IPs the container holds, and ports mapped on every one.

    ``-p IP:PORT/PROTO`` adds IP to the container's IPs. The API maps each port on every IP,
    so a port tied to one IP is refused when the container holds others (say it with
    ``map add`` instead) rather than silently published on them too.
    """
    for value in ips:
        try:
            parse_ip(value)
        except InvalidInput as exc:
            raise typer.BadParameter(exc.reason, param_hint="'--ip'") from None
    wanted = [parse_published(v) for v in specs]
    holds = list(dict.fromkeys([*ips, *(at for at, _ in wanted if at)]))
    if not holds:
        raise typer.BadParameter("at least one public IP is required (--ip IP, or -p IP:PORT/PROTO)", param_hint="'--ip'")
    for (at, _), value in zip(wanted, specs, strict=True):
        if at is not None and len(holds) > 1:
            others = ", ".join(i for i in holds if i != at)
            raise typer.BadParameter(
                f"{value!r} would also be mapped on {others} (every port is mapped on every IP of the container); "
                "give it without IP, or add it afterwards with `portmesh map add`",
                param_hint="'--port' / '-p'",
            )
    ports = list({(p["port"], p["proto"]): p for _, p in wanted}.values())
    return holds, ports


def check_names(values: list[str]) -> list[str]:
    return [check_name(v) for v in values]


def mapping_target(first: str, second: str | None) -> tuple[str, dict[str, Any]]:
    """``IP PORT/PROTO`` or ``IP:PORT/PROTO``, checked before anything is sent."""
    if second is None:
        ip, spec = parse_published(first, "'IP:PORT/PROTO'")
        if ip is None:
            raise typer.BadParameter(f"{first!r} has no IP: give IP:PORT/PROTO, or IP PORT/PROTO", param_hint="'IP:PORT/PROTO'")
        return ip, spec
    try:
        parse_ip(first, "IP")
    except InvalidInput as exc:
        raise typer.BadParameter(exc.reason, param_hint="'IP'") from None
    return first, parse_port_spec(second, "'PORT/PROTO'")
