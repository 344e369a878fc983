"""The assignments, made and graded by nbgrader itself with the course's configuration (course/).

What the release hands out (no solutions, no hidden tests, stored outputs only where students need
them), and what `nbgrader autograde` + `generate_feedback` give a student who hands in the solutions
(full marks), one with a planted mistake per assignment (partial marks; the feedback shows the check's
one-line message), and one who copies the library or fits the visible cases (zero on those
exercises). Notebooks graded: nbgrader_course.GRADED (one per assignment in CI; all with
MOBA_EDU_GRADE_ALL=1, `make assignments-check`).
"""

import re
from pathlib import Path

import nbformat
import pytest
import torch

from moba_edu import routing
from moba_edu.checks import Mistake, nb00, nb03, nb05, nb09
from nbgrader_course import (GRADED, ROOT, answer, autograde, errors, feedback, feedback_text, meta, moba_course,
                             notebook_names, read, release, scores, submit)

PLANTED = {  # assignment -> (solution grade_id, a wrong answer, its check): one slip each
    "A1": ("nb00-num-blocks", "def num_blocks(S, block_size):\n    return S // block_size\n",
           nb00.check_num_blocks),
    "A2": ("nb03-needle-blocks", "def needle_blocks(needle_key, needle_query, block_size, top_k):\n"
           "    return {needle_query // block_size, needle_key // block_size}\n", nb03.check_needle_blocks),
    "A3": ("nb05-attention-update", "def attention_update(m, l, acc, s, v):\n"
           "    m_new = torch.maximum(m, s.max(dim=1).values)\n"
           "    p = torch.exp(s - m_new[:, None])\n"
           "    return m_new, l + p.sum(dim=1), acc * torch.exp(m - m_new)[:, None] + p @ v\n",
           nb05.check_attention_update),
    "A4": ("nb09-route-token", "def route_token(q_t, means, t, block_size, top_k):\n"
           "    gates = means[:t // block_size + 1].float() @ q_t.float()\n"
           "    return gates.topk(min(top_k - 1, len(gates))).indices\n", nb09.check_route_token),
}
for _assignment, (_grade_id, _, _) in PLANTED.items():  # a planted notebook is always graded
    assert _grade_id[2:4] in GRADED[_assignment]


def fitted_num_blocks() -> str:
    """A num_blocks that answers the visible check's own cases from a table, and S // block_size else."""
    seen = {}
    nb00.check_num_blocks(lambda S, b: seen.setdefault((S, b), routing.num_blocks(S, b)))
    return f"SEEN = {seen!r}\n\ndef num_blocks(S, block_size):\n    return SEEN.get((S, block_size), S // block_size)\n"


COPIED = {  # solution grade_id -> (an answer that is not the student's work, the exception that zeroes it)
    "nb00-num-blocks": (fitted_num_blocks(), "Mistake"),  # the hidden test's cases were not in the table
    "nb00-causal-fraction": ("from moba_edu.cost import attended_pairs\n\n"
                             "def causal_fraction(S, block_size, top_k):\n"
                             "    return attended_pairs(S, block_size, top_k) / (S * (S + 1) / 2)\n", "WriteItYourself"),
    "nb02-eligible": ("from moba_edu import routing\n\neligible = routing.eligible\n", "WriteItYourself"),
    "nb02-block-means": ("from moba_edu import routing\n\n"
                         "block_means = lambda k, block_size: routing.block_means(k[None, None], block_size)[0, 0]\n",
                         "WriteItYourself"),
}


def define(source: str):
    """The function that `source` (one planted answer) defines last."""
    namespace = {"torch": torch}
    exec(source, namespace)  # noqa: S102 (the test's own planted answer)
    return [v for k, v in namespace.items() if callable(v) and k != "torch"][-1]


def message(source: str, check) -> str:
    """The one-line message `check` raises for the answer `source` defines, run here."""
    with pytest.raises(Mistake) as failure:
        check(define(source))
    return str(failure.value)


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """Released; students "solutions", "planted" and (A1) "copied" submitted; autograded; feedback."""
    course = release(tmp_path_factory.mktemp("course"))
    for assignment, numbers in GRADED.items():
        for name in notebook_names(assignment, numbers):
            source = read(course, "source", assignment, name)
            submit(course, "solutions", assignment, name, source)
            grade_id, wrong, _ = PLANTED[assignment]
            submit(course, "planted", assignment, name, answer(source, grade_id, wrong)
                   if grade_id.startswith(f"nb{name[:2]}") else source)
    for name in notebook_names("A1", ("00", "02")):
        nb = read(course, "source", "A1", name)
        for grade_id, (source, _) in COPIED.items():
            if grade_id.startswith(f"nb{name[:2]}"):
                nb = answer(nb, grade_id, source)
        submit(course, "copied", "A1", name, nb)
    for assignment in GRADED:
        autograde(course, assignment)
        feedback(course, assignment)
    return course


def test_every_notebook_has_graded_exercises_with_hidden_tests():
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        solutions = [c for c in nb.cells if meta(c).get("solution")]
        checks = [c for c in nb.cells if meta(c).get("grade")]
        assert len(solutions) >= 2 and len(checks) >= 2, f"{path.name}: needs >= 2 exercises with checks"
        assert all("### BEGIN SOLUTION" in c.source for c in solutions), f"{path.name}: a solution cell lacks markers"
        assert all("### BEGIN HIDDEN TESTS" in c.source and meta(c).get("locked") and meta(c)["points"] > 0
                   for c in checks), f"{path.name}: a check cell lacks hidden tests, a lock or points"
        ids = [meta(c)["grade_id"] for c in solutions + checks]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate grade_id"


def test_points_in_the_guide_match_the_notebooks():
    guide = (ROOT / "docs" / "teaching.md").read_text()
    for assignment in moba_course.ASSIGNMENTS:
        cells = [c for p in moba_course.notebooks(assignment) for c in nbformat.read(p, as_version=4).cells]
        total = sum(meta(c)["points"] for c in cells if meta(c).get("grade"))
        row = re.search(rf"^\| {assignment} \|.*\| (\d+) \|$", guide, re.M)
        assert row and int(row.group(1)) == total, f"docs/teaching.md: {assignment} is worth {total} points"


@pytest.mark.parametrize("assignment", sorted(moba_course.ASSIGNMENTS))
def test_release_hides_solutions_and_hidden_tests(course, assignment):
    keep = moba_course.KeepStoredOutputs().keep_outputs
    for name in notebook_names(assignment):
        source, handed_out = read(course, "source", assignment, name), read(course, "release", assignment, name)
        assert [c.cell_type for c in source.cells] == [c.cell_type for c in handed_out.cells]
        kept = any(Path(name).match(pattern) for pattern in keep)
        for before, after in zip(source.cells, handed_out.cells):
            assert "SOLUTION" not in after.source and "HIDDEN TESTS" not in after.source
            if meta(before).get("solution"):
                assert "raise NotImplementedError()" in after.source
            if after.cell_type == "code":
                exercise = meta(before).get("solution") or meta(before).get("grade")
                assert after.outputs == (before.outputs if kept and not exercise else []), (
                    f"{name}: outputs should be {'kept' if kept and not exercise else 'cleared'}:\n{before.source[:200]}")
        if kept:
            assert any(c.outputs for c in handed_out.cells if c.cell_type == "code"), f"{name}: no stored outputs kept"


@pytest.mark.parametrize("assignment", sorted(GRADED))
def test_solutions_get_full_marks(course, assignment):
    graded = scores(course, assignment, "solutions", notebook_names(assignment, GRADED[assignment]))
    assert graded and all(score == points for score, points in graded.values()), graded
    for name in notebook_names(assignment, GRADED[assignment]):
        assert not errors(read(course, "autograded", assignment, name, "solutions")), f"{name}: a cell failed"


@pytest.mark.parametrize("assignment", sorted(GRADED))
def test_a_planted_mistake_costs_its_points_and_the_feedback_names_it(course, assignment):
    grade_id, wrong, check = PLANTED[assignment]
    graded = scores(course, assignment, "planted", notebook_names(assignment, GRADED[assignment]))
    assert graded[f"{grade_id}-check"][0] == 0
    assert all(score == points for cell, (score, points) in graded.items() if cell != f"{grade_id}-check")
    assert 0 < sum(score for score, _ in graded.values()) < sum(points for _, points in graded.values())
    expected = message(wrong, check)
    name = next(n for n in notebook_names(assignment) if n.startswith(grade_id[2:4]))
    failed = [error for cell, error in errors(read(course, "autograded", assignment, name, "planted"))]
    assert [(e.ename, e.evalue) for e in failed] == [("Mistake", expected)]
    assert expected in feedback_text(course, assignment, "planted", name)


def test_copying_the_library_or_fitting_the_visible_cases_scores_zero(course):
    graded = scores(course, "A1", "copied", notebook_names("A1", ("00", "02")))
    for grade_id, (_, exception) in COPIED.items():
        assert graded[f"{grade_id}-check"][0] == 0, grade_id
        name = next(n for n in notebook_names("A1") if n.startswith(grade_id[2:4]))
        failed = {meta(c)["grade_id"]: e for c, e in errors(read(course, "autograded", "A1", name, "copied"))}
        assert failed[f"{grade_id}-check"].ename == exception
        if exception == "Mistake":
            assert failed[f"{grade_id}-check"].evalue.startswith("hidden test:")
    others = [cell for cell in graded if cell.removesuffix("-check") not in COPIED]
    assert others and all(graded[cell][0] == graded[cell][1] for cell in others)
    nb00.check_num_blocks(define(COPIED["nb00-num-blocks"][0]))  # the table passes the visible check
