"""docs/architecture.svg is what scripts/draw_architecture.py draws, and a well-formed SVG."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "draw_architecture.py"
SVG = REPO / "docs" / "architecture.svg"


def test_the_committed_picture_is_the_scripts_output() -> None:
    res = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_the_picture_is_well_formed_svg_that_names_each_part() -> None:
    root = ET.fromstring(SVG.read_text())
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    text = " ".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))
    for part in (
        "Kubernetes API server",
        "admission webhook",
        "build queue",
        "build Job",
        "S3 engine store",
        "fetch-engine",
        "GPU preflight",
        "metering proxy",
        "trtllm-serve",
        "Service",
        "Prometheus",
    ):
        assert part in text, part
    # Every arrowhead a line asks for is defined.
    ids = {m.get("id") for m in root.iter("{http://www.w3.org/2000/svg}marker")}
    for line in root.iter("{http://www.w3.org/2000/svg}polyline"):
        for attr in ("marker-end", "marker-start"):
            if line.get(attr):
                assert line.get(attr, "").removeprefix("url(#").removesuffix(")") in ids


def test_the_check_catches_a_stale_picture(tmp_path: Path) -> None:
    stale = tmp_path / "draw.py"
    stale.write_text(
        SCRIPT.read_text().replace(
            'OUT = Path(__file__).resolve().parents[1] / "docs" / "architecture.svg"', f'OUT = Path("{tmp_path}/a.svg")'
        )
    )
    (tmp_path / "a.svg").write_text(SVG.read_text().replace("build queue", "build  queue"))
    res = subprocess.run([sys.executable, str(stale), "--check"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "is not what" in res.stderr
