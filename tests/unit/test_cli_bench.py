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
from typing import Any

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


def _dataplane_modules() -> tuple[Any, Any]:
    """bench/dataplane_bench.py and dataplane_multihost.py, imported as bench/dataplane imports them."""
    import importlib
    import sys

    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("dataplane_bench"), importlib.import_module("dataplane_multihost")


def test_dataplane_multihost_alias_names_the_four_cross_host_paths() -> None:
    bench, multihost = _dataplane_modules()
    args = bench.parse_args(["--paths", "portmesh,multihost"])
    assert args.paths == ["portmesh", *multihost.MH_PATHS]
    assert tuple(bench.MH_PATHS) == multihost.MH_PATHS
    # Each of them is a path the benchmark can build (Bench.path dispatches them to dataplane_multihost).
    assert set(multihost.MH_PATHS) <= set(bench.PATHS)


def test_dataplane_ebpf_paths_and_targets() -> None:
    bench, _multihost = _dataplane_modules()
    import dataplane_ebpf

    assert bench.DEFAULT_PATHS == ("direct", "bridge_dnat", "ovs_ctnat", "portmesh", "portmesh_ebpf")
    args = bench.parse_args(["--paths", "multihost_ebpf"])
    assert args.paths == ["mh_ebpf_c2c_same", "mh_ebpf_c2c_cross", "mh_ebpf_inet_gw", "mh_ebpf_inet_compute"]
    results: dict[str, dict[str, Any]] = {
        "direct": {"gbps": 10.0, "conn_per_s": 1000.0, "rtt_ms_p50": 0.10},
        "bridge_dnat": {"gbps": 8.0, "conn_per_s": 800.0, "rtt_ms_p50": 0.10},
        "portmesh": {"gbps": 6.0, "conn_per_s": 700.0, "rtt_ms_p50": 0.20},
        "portmesh_ebpf": {"gbps": 9.5, "conn_per_s": 850.0, "rtt_ms_p50": 0.10},
    }
    goals = dataplane_ebpf.targets(results)
    assert goals["portmesh_ebpf/bridge_dnat"]["gbps"] == {"ratio": 1.188, "met": True}
    assert goals["portmesh_ebpf/direct"]["conn_per_s"] == {"ratio": 0.85, "met": False}
    assert goals["portmesh/bridge_dnat"]["rtt_ms_p50"] == {"ratio": 0.5, "met": False}
    assert "portmesh_ebpf/bridge_dnat" in bench.ratios(results)


def test_dataplane_cross_host_ratios() -> None:
    _bench, multihost = _dataplane_modules()
    results: dict[str, dict[str, Any]] = {
        "mh_c2c_same": {"gbps": 10.0, "rtt_ms_p50": 0.10},
        "mh_c2c_cross": {"gbps": 7.0, "rtt_ms_p50": 0.20},
        "mh_inet_gw": {"gbps": 8.0, "rtt_ms_p50": 0.20},
        "mh_inet_compute": {"status": "unavailable", "reason": "x"},
    }
    out = multihost.cross_host(results)
    assert set(out) == {"c2c"}  # inet has no cross-host figure: nothing made up
    assert out["c2c"]["gbps_ratio"] == 0.7 and out["c2c"]["throughput_meets_target"] is False
    assert out["c2c"]["rtt_ratio_same_over_cross"] == 0.5
    results["mh_c2c_cross"]["gbps"] = 8.5
    assert multihost.cross_host(results)["c2c"]["throughput_meets_target"] is True


def test_dataplane_cross_host_projection_uses_the_busiest_switch() -> None:
    _bench, multihost = _dataplane_modules()
    same = {"gbps": 6.0, "rtt_ms_p50": 0.15, "switch_cpu_ms_per_gb_h2": 600.0, "switch_cpu_ms_per_gb_h3": 0.0}
    cross = {"gbps": 4.0, "rtt_ms_p50": 0.3, "switch_cpu_ms_per_gb_h2": 750.0, "switch_cpu_ms_per_gb_h3": 500.0}
    out = multihost.cross_host({"mh_c2c_same": same, "mh_c2c_cross": cross})["c2c"]
    assert out["busiest_switch_ms_per_gb_cross"] == 750.0 and out["busiest_switch_ms_per_gb_same"] == 600.0
    assert out["projected_ratio_own_cpus_per_host"] == 0.8
    assert out["gbps_ratio"] == 0.667 and out["throughput_meets_target"] is False  # the measured figure stays the verdict
    # Without CPU figures there is no projection, not a made-up one.
    bare = {"mh_c2c_same": {"gbps": 6.0, "rtt_ms_p50": 0.15}, "mh_c2c_cross": {"gbps": 4.0, "rtt_ms_p50": 0.3}}
    plain = multihost.cross_host(bare)
    assert "projected_ratio_own_cpus_per_host" not in plain["c2c"]


def test_dataplane_balancing_on_ebpf_is_its_own_group() -> None:
    bench, _multihost = _dataplane_modules()
    import dataplane_balancing

    args = bench.parse_args(["--paths", "balancing,balancing_ebpf"])
    assert args.paths == ["lb_single", "lb_spread", "lb_three", "lb_ebpf_single", "lb_ebpf_spread", "lb_ebpf_three"]
    results: dict[str, dict[str, Any]] = {
        "lb_single": {"conn_per_s": 1000.0},
        "lb_three": {"conn_per_s": 500.0},
        "lb_ebpf_single": {"conn_per_s": 2000.0},
        "lb_ebpf_spread": {"conn_per_s": 1600.0, "per_round": {"conn_per_s": [1500.0, 1700.0]}},
        "lb_ebpf_three": {"conn_per_s": 1520.0, "per_round": {"conn_per_s": [1500.0, 1530.0]}},
    }
    assert dataplane_balancing.balancing(results)["conn_ratio"] == 0.5
    assert "conn_ratio_three_vs_spread" not in dataplane_balancing.balancing(results)  # no control measured
    ebpf = dataplane_balancing.balancing(results, "lb_ebpf_")
    assert ebpf["conn_ratio"] == 0.76 and ebpf["meets_target"] is False  # the issue's figure stays the verdict
    # The control separates the switch's price (3 backends vs the same 3 servers by plain mappings)
    # from the servers' (3 processes vs 1).
    assert ebpf["conn_ratio_three_vs_spread"] == 0.95 and ebpf["conn_ratio_three_vs_spread_per_round"] == [1.0, 0.9]
    assert ebpf["conn_ratio_spread_vs_single"] == 0.8
    assert bench.ratios(results) == {}
