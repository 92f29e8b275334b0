"""Every ``bench/*`` entry starts as the README shows it (``bench/NAME``), whatever ``python3`` its shebang finds.

The system python has none of the project's dependencies (``No module named 'ovs'`` before the
fix): each entry re-executes itself under the repository's ``.venv``. ``--help`` is enough to
prove the imports and argument parsing work; the benchmarks themselves need a lab.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
ENTRIES = sorted(p.name for p in BENCH.iterdir() if p.is_file() and os.access(p, os.X_OK) and not p.suffix)
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


def test_entries_found() -> None:
    assert {"containers", "controlplane", "convergence", "dataplane"} <= set(ENTRIES)


@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="no system python3")
@pytest.mark.parametrize("entry", ENTRIES)
def test_bench_entry_starts_from_the_system_python(entry: str, tmp_path: Path) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path)}  # no venv on PATH, no PYTHONPATH
    done = subprocess.run([str(BENCH / entry), "--help"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout and "Traceback" not in done.stderr
    # Positive control: the system python alone cannot import what the entries need.
    probe = subprocess.run([str(SYSTEM_PYTHON), "-c", "import ovs, pyroute2"], env=env, capture_output=True, timeout=60)
    if probe.returncode == 0:
        pytest.skip("this system python has the dependencies itself: the re-exec is not what made it work")
