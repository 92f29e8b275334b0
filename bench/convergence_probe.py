"""The outside client of bench/convergence, run inside the lab's ``inet`` namespace.

Reads one command per line on stdin and answers one JSON line on stdout:
``open IP PORT NAME`` returns once a TCP connection to IP:PORT is answered by the
container NAME (its whoami line names it); ``closed IP PORT`` returns once a
connection attempt is refused. Each answer carries ``time.monotonic()`` of the
moment it happened: CLOCK_MONOTONIC is the machine's, the same in every network
namespace, so the bench subtracts it from its own clock. Stdlib only.
"""

from __future__ import annotations

import json
import socket
import sys
import time

ATTEMPT_TIMEOUT = 0.2  # a SYN dropped (no flow yet, packet-ins rate-limited) is retried after this
PAUSE = 0.005  # between attempts: keeps packet-ins well under the switch's 100/s controller rate limit
DEADLINE = 10.0


def attempt(ip: str, port: int) -> tuple[str, str]:
    """One connection attempt: ("answered", first line) / ("refused", "") / ("timeout" | "error", why)."""
    s = socket.socket()
    s.settimeout(ATTEMPT_TIMEOUT)
    try:
        s.connect((ip, port))
        s.settimeout(1.0)
        return "answered", s.recv(512).decode(errors="replace")
    except ConnectionRefusedError:
        return "refused", ""
    except TimeoutError:
        return "timeout", ""
    except OSError as exc:
        return "error", str(exc)
    finally:
        s.close()


def wait_for(ip: str, port: int, want: str, name: str = "") -> dict[str, object]:
    start = time.monotonic()
    tries = 0
    while time.monotonic() - start < DEADLINE:
        tries += 1
        outcome, text = attempt(ip, port)
        now = time.monotonic()
        if outcome == want and (want != "answered" or f"name={name} " in text):
            return {"ok": True, "at": now, "tries": tries}
        time.sleep(PAUSE)
    return {"ok": False, "at": time.monotonic(), "tries": tries, "last": f"{outcome} {text}".strip()}


def main() -> int:
    for raw in sys.stdin:
        parts = raw.split()
        if not parts:
            continue
        if parts[0] == "open":
            answer = wait_for(parts[1], int(parts[2]), "answered", parts[3])
        elif parts[0] == "closed":
            answer = wait_for(parts[1], int(parts[2]), "refused")
        else:
            answer = {"ok": False, "error": f"unknown command {parts[0]!r}"}
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
