"""A throwaway copy of the course for tests: nbgrader's own commands (generate_assignment, autograde,
generate_feedback) with the course's configuration, on the repository's notebooks.

CI grades the solutions and the planted mistakes on one notebook per assignment (GRADED, the quickest: FAST); with
MOBA_EDU_GRADE_ALL=1 (`make assignments-check`) on every notebook. The untouched release is always
graded whole (tests/test_student_versions.py).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import sys
from pathlib import Path

import nbformat
from nbgrader.api import Gradebook

ROOT = Path(__file__).resolve().parent.parent
COURSE = ROOT / "course"
sys.path.insert(0, str(COURSE))
import moba_course  # noqa: E402

GRADE_ALL = os.environ.get("MOBA_EDU_GRADE_ALL") == "1"
FAST = {"A1": "00", "A2": "03", "A3": "05", "A4": "09"}  # the quickest notebook of each assignment
GRADED = {a: moba_course.ASSIGNMENTS[a] if GRADE_ALL else (FAST[a],) for a in moba_course.ASSIGNMENTS}


def meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def release(tmp: Path) -> Path:
    """A course folder under `tmp` with the course's configuration and every assignment released."""
    for name in ("nbgrader_config.py", "moba_course.py"):
        shutil.copy(COURSE / name, tmp / name)
    moba_course.release(tmp)
    return tmp


def read(course: Path, step: str, assignment: str, name: str, student: str | None = None):
    """A notebook of the course: step is source, release, submitted or autograded."""
    folder = course / step / (student or "") / assignment if step in ("submitted", "autograded") else course / step / assignment
    return nbformat.read(folder / f"{name}.ipynb", as_version=4)


def notebook_names(assignment: str, numbers=None) -> list[str]:
    wanted = numbers or moba_course.ASSIGNMENTS[assignment]
    return [p.stem for p in moba_course.notebooks(assignment) if p.name[:2] in wanted]


def submit(course: Path, student: str, assignment: str, name: str, nb) -> None:
    folder = course / "submitted" / student / assignment
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / f"{name}.ipynb")


def answer(nb, grade_id: str, source: str):
    """`nb` with the solution cell `grade_id` replaced by `source`."""
    nb = nbformat.from_dict(nb)
    cell = next(c for c in nb.cells if meta(c).get("grade_id") == grade_id)
    cell.source = source
    return nb


def autograde(course: Path, assignment: str) -> None:
    moba_course.nbgrader(course, "autograde", assignment, "--force")


def feedback(course: Path, assignment: str) -> None:
    moba_course.nbgrader(course, "generate_feedback", assignment, "--force")


def scores(course: Path, assignment: str, student: str, names=None) -> dict[str, tuple[float, float]]:
    """{grade_id: (score, max_score)} of every autograded cell of the student's submission, in the
    notebooks `names` only if given (a notebook not handed in scores zero)."""
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", course_id="moba-edu") as gb:
        return {g.name: (g.score, g.max_score) for nb in gb.find_submission(assignment, student).notebooks
                if names is None or nb.name in names for g in nb.grades if g.cell.cell_type == "code"}


def feedback_text(course: Path, assignment: str, student: str, name: str) -> str:
    """The feedback page a student reads, as plain text."""
    page = (course / "feedback" / student / assignment / f"{name}.html").read_text()
    return html.unescape(re.sub(r"<[^>]+>", "", page))


def errors(nb) -> list[tuple[object, object]]:
    """(cell, first error output) of every code cell that failed."""
    return [(c, e[0]) for c in nb.cells if c.cell_type == "code"
            for e in [[o for o in c.get("outputs", []) if o.output_type == "error"]] if e]
