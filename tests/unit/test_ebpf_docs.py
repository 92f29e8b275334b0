"""docs/ebpf.md names every map, drop reason and program the datapath has (they are declared once, in C)."""

from __future__ import annotations

import re
from pathlib import Path

from portmesh.agent.ebpf import layout

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "ebpf.md").read_text()
SOURCE = (ROOT / "portmesh" / "agent" / "ebpf").glob("*.[ch]")


def test_every_map_is_documented() -> None:
    declared = set()
    for path in SOURCE:
        declared |= set(re.findall(r"^\}\s*(\w+)\s+SEC\(\"\.maps\"\)", path.read_text(), re.MULTILINE))
    assert set(layout.MAPS) | set(layout.STAT_MAPS) <= declared, "layout names a map the C source does not declare"
    missing = sorted(m for m in declared if f"`{m}`" not in DOC)
    assert not missing, f"docs/ebpf.md does not describe the maps {missing}"


def test_every_drop_reason_and_program_is_documented() -> None:
    assert not [r.name for r in layout.DropReason if f"`{r.name}`" not in DOC]
    for program in ("pm_from_container", "pm_from_uplink", "pm_from_tunnel"):
        assert f"`{program}`" in DOC
