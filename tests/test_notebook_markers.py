"""nbval reads a marker comment only when the whole comment is the marker (`# NBVAL_IGNORE_OUTPUT`):
`# NBVAL_IGNORE_OUTPUT (timings)` is silently not a marker, and the cell's output is then compared.
Explanations go on a comment line of their own."""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))
MARKER = re.compile(r"^\s*#+\s*(NBVAL_\w+)(.*)$")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_nbval_markers_stand_alone(path):
    cells = json.loads(path.read_text())["cells"]
    bad = [line.strip() for cell in cells if cell["cell_type"] == "code"
           for line in "".join(cell["source"]).splitlines()
           if (m := MARKER.match(line)) and m.group(2).strip()]
    assert not bad, f"{path.name}: nbval ignores these markers (text after the marker): {bad}"
