"""The code rules as tests: ruff and mypy --strict clean, dependencies pointing one way."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
PACKAGE = ROOT / "portmesh"

# component -> the portmesh components it may import
ALLOWED = {
    "model": set(),
    "store": {"model"},
    "controller": {"model", "store"},
    "agent": {"model", "store", "runtime"},
    "runtime": {"model"},
    "api": {"model", "store"},
    "cli": {"model"},
    "lab": {"model", "store", "controller", "agent", "runtime", "api", "cli"},
}


def imported_components(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "portmesh" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_dependencies_point_one_way() -> None:
    bad = []
    for component, allowed in ALLOWED.items():
        for path in (PACKAGE / component).rglob("*.py"):
            extra = imported_components(path) - allowed - {component}
            if extra:
                bad.append(f"{path.relative_to(ROOT)} imports {sorted(extra)}")
    assert not bad, "\n".join(bad)


def test_ruff_clean() -> None:
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--quiet", "portmesh", "tests", "bench"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict_clean() -> None:
    done = subprocess.run([sys.executable, "-m", "mypy", "--strict", "portmesh"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
