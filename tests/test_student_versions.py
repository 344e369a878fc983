"""The student version of every notebook still runs.

A teacher hands out notebooks with the solutions removed (nbgrader replaces the code between
`### BEGIN SOLUTION` and `### END SOLUTION`). Later cells must use the library's version, never the
student's answer, so the student version runs top to bottom and only the exercise checks fail, with
NotImplementedError. This test makes the student version the way nbgrader does and executes it.
"""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SOLUTION = re.compile(r"^([ \t]*)### BEGIN SOLUTION\n.*?^[ \t]*### END SOLUTION[ \t]*$", re.S | re.M)


def nbgrader(cell):
    return cell.get("metadata", {}).get("nbgrader", {})


def student_version(nb):
    """Replace each solution by `raise NotImplementedError()` (nbgrader's default stub)."""
    for cell in nb.cells:
        if cell.cell_type == "code" and nbgrader(cell).get("solution"):
            cell.source = SOLUTION.sub(lambda m: f"{m.group(1)}# YOUR CODE HERE\n{m.group(1)}raise NotImplementedError()",
                                       cell.source)
    return nb


def test_every_notebook_has_graded_exercises():
    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        solutions = [c for c in nb.cells if nbgrader(c).get("solution")]
        checks = [c for c in nb.cells if nbgrader(c).get("grade")]
        assert len(solutions) >= 2 and len(checks) >= 2, f"{path.name}: needs >= 2 exercises with checks"
        assert all(SOLUTION.search(c.source) for c in solutions), f"{path.name}: a solution cell lacks markers"
        ids = [nbgrader(c)["grade_id"] for c in solutions + checks]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate grade_id"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_student_version_runs(path, tmp_path):
    nb = student_version(nbformat.read(path, as_version=4))
    NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        errors = [o for o in cell.get("outputs", []) if o.output_type == "error"]
        if not errors:
            continue
        exercise = nbgrader(cell).get("solution") or nbgrader(cell).get("grade")
        assert exercise and errors[0].ename == "NotImplementedError", (
            f"{path.name}: a cell outside the exercises fails in the student version "
            f"({errors[0].ename}: {errors[0].evalue}):\n{cell.source[:300]}")
