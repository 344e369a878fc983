"""The student version of every notebook still runs, made and graded by nbgrader itself.

`nbgrader generate_assignment` (with the course's configuration, course/) replaces every solution by
`raise NotImplementedError()` and cuts the hidden tests; `nbgrader autograde` puts the hidden tests
back and runs each notebook top to bottom in grading mode. Handed in untouched, every notebook must
score zero on every exercise, and only the exercise cells may fail, with NotImplementedError: later
cells use the library's version, never the student's.
"""

import pytest

from nbgrader_course import autograde, errors, meta, moba_course, notebook_names, read, release, scores, submit

NOTEBOOKS = sorted(p for a in moba_course.ASSIGNMENTS for p in moba_course.notebooks(a))


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """Every assignment released, submitted untouched by the student "release", and autograded."""
    course = release(tmp_path_factory.mktemp("course"))
    for assignment in moba_course.ASSIGNMENTS:
        for name in notebook_names(assignment):
            submit(course, "release", assignment, name, read(course, "release", assignment, name))
        autograde(course, assignment)
    return course


def test_every_notebook_belongs_to_one_assignment():
    listed = sorted(p.name for a in moba_course.ASSIGNMENTS for p in moba_course.notebooks(a))
    assert len(listed) == len(set(listed))
    on_disk = sorted(p.name for p in moba_course.NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    assert listed == on_disk, "every notebook is in one assignment: add it to ASSIGNMENTS in course/moba_course.py"


@pytest.mark.parametrize("assignment", sorted(moba_course.ASSIGNMENTS))
def test_untouched_release_scores_zero(course, assignment):
    graded = scores(course, assignment, "release")
    expected = {meta(c)["grade_id"] for name in notebook_names(assignment)
                for c in read(course, "source", assignment, name).cells if meta(c).get("grade")}
    assert set(graded) == expected
    assert all(score == 0 and points > 0 for score, points in graded.values()), graded


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_student_version_runs(course, path):
    assignment = next(a for a in moba_course.ASSIGNMENTS if path in moba_course.notebooks(a))
    nb = read(course, "autograded", assignment, path.stem, "release")
    for cell, error in errors(nb):
        exercise = meta(cell).get("solution") or meta(cell).get("grade")
        assert exercise and error.ename == "NotImplementedError", (
            f"{path.name}: a cell outside the exercises fails in the student version "
            f"({error.ename}: {error.evalue}):\n{cell.source[:300]}")
    failed = {meta(c).get("grade_id") for c, _ in errors(nb)}
    checks = {meta(c)["grade_id"] for c in nb.cells if meta(c).get("grade")}
    assert checks <= failed, f"{path.name}: a check passed with no answer written: {sorted(checks - failed)}"
