"""Turning API answers into rich tables for people (``-o json`` bypasses all of this).

Functions take the API's JSON as it comes: the CLI does not share types with the
API, only the wire format, so a field the API adds later shows up in JSON output
without a CLI change.

Everything shown is machine text (names, MACs, commands, messages) and is printed
literally: the console is built with markup and emoji codes off (``02:9a:1d:ab:b5:cc``
must not gain a 🆎), and every cell is a :class:`~rich.text.Text`, never a markup string.
"""

from __future__ import annotations

import shlex
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

Json = dict[str, Any]

# Console width off a terminal: a pipe has no width, so a table is as wide as its content.
PIPE_WIDTH = 100_000


def command_line(argv: list[str] | None) -> str:
    """A command as a shell would need it typed: quoting and brackets kept (``sh -c 'a [/]'``)."""
    return shlex.join(argv) if argv else "-"


def _row(*cells: str) -> list[Text]:
    return [Text(cell) for cell in cells]


def _ports(mappings: list[Json]) -> str:
    seen: dict[str, list[str]] = {}
    for m in mappings:
        seen.setdefault(f"{m['port']}/{m['proto']}", []).append(m["public_ip"])
    return ", ".join(seen) or "-"


def _state(c: Json) -> str:
    """``exited (exit 3, 2 restarts) (want up)``: what runs, how it last ended, and what is wanted if that differs."""
    status = c.get("status")
    actual = status["state"] if status else "pending"
    desired = "up" if c.get("running") else "down"
    extra = []
    if status and status.get("exit_code") is not None and actual != "running":
        extra.append(f"exit {status['exit_code']}")
    if status and status.get("restarts"):
        extra.append(f"{status['restarts']} restart{'s' if status['restarts'] != 1 else ''}")
    how = f" ({', '.join(extra)})" if extra else ""
    # Say what is wanted only where it differs from what runs: "running" alone is the normal case.
    settled = (actual == "running") == (desired == "up")
    return f"{actual}{how}" if settled else f"{actual}{how} (want {desired})"


def _print(console: Console, table: Table) -> None:
    """A table without the padding rich leaves after the last column (``ps | cut``, diffs and tests see clean lines)."""
    with console.capture() as captured:
        console.print(table)
    console.out("\n".join(line.rstrip() for line in captured.get().rstrip("\n").split("\n")), highlight=False)


def _new_table(*headers: str) -> Table:
    # On a terminal long cells wrap to fit the screen; off one the console is PIPE_WIDTH wide, so they never do.
    return Table(*headers, box=None, header_style="bold", pad_edge=False)


def containers(console: Console, items: list[Json]) -> None:
    table = _new_table("NAME", "HOST", "IPS", "PORTS", "STATE", "BLOCK")
    for c in items:
        block = c["block"]
        table.add_row(
            *_row(c["name"], c["host"], ", ".join(c["ips"]), _ports(c["mappings"]), _state(c), f"{block['start']}-{block['end']}")
        )
    _print(console, table)


def container(console: Console, c: Json) -> None:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    status = c.get("status") or {}
    rows = [
        ("name", c["name"]),
        ("host", c["host"]),
        ("state", _state(c)),
        ("ips", ", ".join(c["ips"])),
        ("mac", c["mac"]),
        ("port", c["port_name"]),
        ("block", f"{c['block']['start']}-{c['block']['end']} ({c['block']['size']} ports)"),
        ("image", c.get("image") or "-"),
        ("command", command_line(c.get("command"))),
        ("restart", f"{c.get('restart') or 'no'} ({status.get('restarts') or 0} so far)"),
        ("exit code", "-" if status.get("exit_code") is None else str(status["exit_code"])),
        ("netns", status.get("netns") or "-"),
        ("pid", str(status.get("pid") or "-")),
    ]
    if status.get("message"):
        rows.append(("message", status["message"]))
    for key, value in rows:
        table.add_row(*_row(key, value))
    _print(console, table)
    if c["mappings"]:
        console.print()
        mappings(console, c["mappings"])


def _mark(health: str) -> str:
    """A backend's health in a table cell: ``up``, ``down``, or nothing when not checked."""
    return "" if not health or health == "unchecked" else health.split(":", 1)[0]


def backends(m: Json) -> str:
    """``web-a(up) web-b*2(down) web-c``: each backend, its weight if not 1, its health if checked."""
    cells = []
    for b in m.get("backends") or [{"container": m["container"], "weight": 1, "health": "unchecked"}]:
        weight = f"*{b['weight']}" if b.get("weight", 1) != 1 else ""
        mark = _mark(str(b.get("health", "")))
        cells.append(f"{b['container']}{weight}({mark})" if mark else f"{b['container']}{weight}")
    return " ".join(cells)


def policy(m: Json) -> str:
    """``allow 198.51.100.0/25; deny 198.51.100.7/32``, or ``open`` (a mapped port is open by default)."""
    parts = []
    if m.get("allow"):
        parts.append("allow " + ", ".join(m["allow"]))
    if m.get("deny"):
        parts.append("deny " + ", ".join(m["deny"]))
    return "; ".join(parts) or "open"


def health_check(h: Json | None) -> str:
    """``http GET /healthz expect 200 on :8080, every 2s, timeout 1s, 2 in a row`` or ``-``."""
    if not h:
        return "-"
    what = f"http GET {h['path']} expect {h['expect']}" if h["kind"] == "http" else "tcp connect"
    port = f" on :{h['port']}" if h.get("port") else ""
    return f"{what}{port}, every {h['interval']:g}s, timeout {h['timeout']:g}s, {h['threshold']} in a row"


def mappings(console: Console, items: list[Json]) -> None:
    table = _new_table("PUBLIC IP", "PORT", "PROTO", "BACKENDS", "POLICY")
    for m in items:
        table.add_row(*_row(m["public_ip"], str(m["port"]), m["proto"], backends(m), policy(m)))
    _print(console, table)


def mapping(console: Console, m: Json) -> None:
    """``map inspect``: the key, policy, health check, counters, then one line per backend."""
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    counters = m.get("counters") or {}
    rows = [
        ("mapping", f"{m['public_ip']}:{m['port']}/{m['proto']}"),
        ("allow", ", ".join(m.get("allow") or []) or "all"),
        ("deny", ", ".join(m.get("deny") or []) or "-"),
        ("health check", health_check(m.get("health"))),
        ("allowed", f"{counters.get('allowed_packets', 0)} packets, {counters.get('allowed_bytes', 0)} bytes"),
        ("denied", f"{counters.get('denied_packets', 0)} packets, {counters.get('denied_bytes', 0)} bytes"),
    ]
    for key, value in rows:
        table.add_row(*_row(key, value))
    _print(console, table)
    console.print()
    listing = _new_table("BACKEND", "WEIGHT", "HEALTH")
    for b in m.get("backends") or []:
        listing.add_row(*_row(b["container"], str(b["weight"]), b["health"]))
    _print(console, listing)


def tunnels(items: list[Json]) -> str:
    """``2/2 up``, or ``1/2 up; down: h3 (no route)``: how many of a host's tunnels are up, and which are not."""
    if not items:
        return "-"
    down = []
    for t in items:
        if not t.get("up"):
            why = str(t.get("state", "")).removeprefix("down").lstrip(": ")
            down.append(f"{t['peer']} ({why})" if why else str(t["peer"]))
    text = f"{len(items) - len(down)}/{len(items)} up"
    return f"{text}; down: {', '.join(down)}" if down else text


def hosts(console: Console, items: list[Json]) -> None:
    drops = any(h.get("drops") for h in items)  # an eBPF host's datapath drops: a column only when one reports them
    # Why a host is down or its agent dead (lease expired): a column only when one is, as DROPS.
    downs = [host_down(h) for h in items]
    heads = ("NAME", "ROLE", "DATAPATH ID", "UNDERLAY", "TUNNELS", "CONNECTED", "CONTAINERS", "SWITCH", "AGENT")
    table = _new_table(*heads, *(("DROPS",) if drops else ()), *(("DOWN",) if any(downs) else ()))
    for h, down in zip(items, downs, strict=True):
        st = h.get("status") or {}
        table.add_row(
            *_row(
                h["name"],
                h.get("role") or "-",
                f"{h['datapath_id']:016x}",
                h.get("underlay_ip") or "-",
                tunnels(h.get("tunnels") or []),
                "yes" if st.get("switch_connected") else "no",
                str(h.get("containers", "-")),
                str(st.get("switch_generation", "-")),
                str(st.get("agent_generation", "-")),
                *((drop_counts(h.get("drops") or {}),) if drops else ()),
                *((down or "-",) if any(downs) else ()),
            )
        )
    _print(console, table)


def host_down(host: Json) -> str:
    """``agent lease expired (no heartbeat for 4s)``: why a host counts as down, else why its agent counts
    as dead while the host does not (an OVS switch forwards on: ``agent dead: ...``); empty if neither."""
    if host.get("down"):
        return str(host["down"])
    return f"agent dead: {host['agent_dead']}" if host.get("agent_dead") else ""


def drop_counts(drops: Json) -> str:
    """``refused=40 fence=2``: an eBPF host's drops by reason, most first; ``-`` for none."""
    ranked = sorted(drops.items(), key=lambda kv: (-int(kv[1]), kv[0]))
    return " ".join(f"{reason}={n}" for reason, n in ranked) or "-"


def pools(console: Console, items: list[Json]) -> None:
    table = _new_table("POOL", "ADDRESSES", "USED")
    for p in items:
        table.add_row(*_row(p["pool"], str(p["size"]), str(p["used"])))
    _print(console, table)


def config(console: Console, cfg: Json) -> None:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in cfg.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        table.add_row(*_row(key, shown or "-"))
    _print(console, table)


def status(console: Console, st: Json) -> None:
    verdict = Text("converged", style="green") if st["converged"] else Text("converging", style="yellow")
    console.print(Text.assemble(f"generation {st['generation']}: ", verdict))
    if not st["hosts"]:
        return
    table = _new_table("HOST", "SWITCH", "AGENT", "CONNECTED", "UP TO DATE", "DOWN")
    for h in st["hosts"]:
        table.add_row(
            *_row(
                h["name"],
                str(h["switch_generation"]),
                str(h["agent_generation"]),
                "yes" if h["switch_connected"] else "no",
                "yes" if h["converged"] else "no",
                host_down(h) or "-",  # an OVS host's dead agent too ("agent dead: ..."), though not down
            )
        )
    _print(console, table)
    # Containers that cannot run are listed apart: they do not hold the hosts back (docs/components.md, Waiting).
    for p in st.get("problems") or []:
        console.print(Text(f"not running: {p['name']} on {p['host']}: {state_and_reason(p['state'], p['message'])}"))


def state_and_reason(state: str, message: str | None) -> str:
    """``error: no such file``, but ``exited (code 1)`` rather than ``exited: exited (code 1)``."""
    if not message:
        return state
    return message if message.startswith(state) else f"{state}: {message}"


def write(console: Console, what: str, body: Json) -> None:
    """One line for a write: what happened, at which generation, and whether it is live yet; then one
    line per host that is down and was not waited for (``h3 lags: switch disconnected``)."""
    lagging = body.get("lagging") or []
    if body.get("converged"):
        live = "live on every host that is up" if lagging else "live everywhere"
    else:
        live = "not yet live everywhere"
    console.print(Text(f"{what} (generation {body['generation']}, {live})"))
    for lag in lagging:
        console.print(Text(f"{lag.get('host')} lags: {lag.get('reason')}"))
