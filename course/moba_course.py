"""The moba-edu course for nbgrader: its assignments, and the two steps nbgrader is configured with.

`python course/moba_course.py` (what `make assignments` runs) copies each assignment's notebooks from
notebooks/ into course/source/<assignment>/ (nbgrader's layout) and runs nbgrader's own
`generate_assignment` on each: the student versions land in course/release/<assignment>/.
nbgrader_config.py, next to this file, sets the course up; docs/teaching.md is the teacher's guide.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
from pathlib import Path

from nbgrader.preprocessors import ClearOutput, Execute
from nbgrader.utils import is_grade, is_solution
from traitlets import Integer, List, Unicode

COURSE = Path(__file__).resolve().parent
NOTEBOOKS = COURSE.parent / "notebooks"
# Assignment -> the notebook numbers it hands out. A3 and A4 (notebook 09's decode kernel) need Linux
# (Triton's CPU interpreter) or a GPU; on macOS and Windows students read their stored outputs (or use
# WSL2). A new notebook goes into one assignment here (10, beyond MoBA: append "10" to A4), with its
# points in docs/teaching.md; tests/test_student_versions.py fails until every notebook is listed.
ASSIGNMENTS = {"A1": ("00", "01", "02"), "A2": ("03", "04"), "A3": ("05", "06", "07"), "A4": ("08", "09", "10")}


def notebooks(assignment: str, notebook_dir: Path = NOTEBOOKS) -> list[Path]:
    """The notebooks of `assignment`, in order."""
    found = [path for number in ASSIGNMENTS[assignment] for path in sorted(notebook_dir.glob(f"{number}_*.ipynb"))]
    if len(found) != len(ASSIGNMENTS[assignment]):
        raise FileNotFoundError(f"{assignment}: expected notebooks {ASSIGNMENTS[assignment]} in {notebook_dir}")
    return found


def stage(root: Path = COURSE, notebook_dir: Path = NOTEBOOKS) -> None:
    """Copy every assignment's notebooks into root/source/<assignment>/, replacing what was there."""
    for assignment in ASSIGNMENTS:
        target = root / "source" / assignment
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for path in notebooks(assignment, notebook_dir):
            shutil.copy(path, target / path.name)


def nbgrader(root: Path, *args: str) -> None:
    """Run nbgrader's command line in the course folder `root` (it reads root/nbgrader_config.py).
    nbgrader runs `alembic` (its database migrations) from PATH: this Python's scripts come first."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=root, check=True, env={**os.environ, "PATH": path})


def release(root: Path = COURSE, notebook_dir: Path = NOTEBOOKS) -> None:
    """Stage the notebooks and generate every assignment's student version under root/release/."""
    stage(root, notebook_dir)
    for assignment in ASSIGNMENTS:
        nbgrader(root, "generate_assignment", assignment, "--force")


class KeepStoredOutputs(ClearOutput):
    """nbgrader's ClearOutput, except that in the notebooks matching `keep_outputs` (globs) the cells
    outside the exercises keep their stored outputs: notebooks 05-07 show their H200 and CPU results
    (figures, tables) to students whose machine cannot run Triton. Exercise cells are always cleared."""

    keep_outputs = List(Unicode(), ["05_*", "06_*", "07_*", "09_*"], help="notebook names whose stored outputs "
                        "students keep").tag(config=True)

    def preprocess(self, nb, resources):
        self._keep = any(fnmatch.fnmatch(resources["unique_key"], pattern) for pattern in self.keep_outputs)
        return super().preprocess(nb, resources)

    def preprocess_cell(self, cell, resources, index):
        if self._keep and not (is_solution(cell) or is_grade(cell)):
            return cell, resources
        return super().preprocess_cell(cell, resources, index)


class GradingExecute(Execute):
    """nbgrader's Execute, with the grading switches in the kernel's environment: MOBA_EDU_GRADING=1
    (the library's answers to exercises refuse to stand in for the student's, moba_edu/checks/grading.py)
    and MOBA_EDU_HIDDEN_SEED (which inputs the hidden tests draw, moba_edu/checks/hidden/)."""

    hidden_seed = Integer(0, help="seed of the hidden tests' inputs; choose your own per course").tag(config=True)

    def start_new_kernel(self, **kwargs):  # what nbconvert's ExecutePreprocessor calls
        kwargs["env"] = {**os.environ, **kwargs.get("env", {}), "MOBA_EDU_GRADING": "1",
                         "MOBA_EDU_HIDDEN_SEED": str(self.hidden_seed)}
        return super().start_new_kernel(**kwargs)


if __name__ == "__main__":
    release()
