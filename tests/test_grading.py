"""Grading integrity: hidden tests (moba_edu.checks.hidden) and the guard on the library's answers
(moba_edu.checks.grading). The real nbgrader path is tested in test_nbgrader.py."""

import importlib
import inspect
import json
import math
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

import moba_edu.checks
from moba_edu import routing
from moba_edu.checks import Mistake, grading

ROOT = Path(__file__).resolve().parent.parent
CHECK_MODULES = sorted(m.name for m in pkgutil.iter_modules(moba_edu.checks.__path__) if re.fullmatch(r"nb\d\d", m.name))
VISIBLE = re.compile(r"^(nb\d\d)\.(check_\w+)\((\w+)\)\s*$", re.M)


def solutions(path: Path, tmp_path: Path):
    """The notebook's solution cells as a module (imported from a file, so that triton.jit can read them)."""
    nb = nbformat.read(path, as_version=4)
    cells = [c.source for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")]
    header = "import math\nimport torch\nimport torch.nn.functional as F\nimport triton\nimport triton.language as tl\n"
    (tmp_path / f"solutions_{path.stem}.py").write_text(header + "\n\n".join(cells) + "\n")
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module(f"solutions_{path.stem}")
    finally:
        sys.path.remove(str(tmp_path))


def exercises(functions_only=False):
    """(notebook path, nbNN, check name, answer name) of every visible check in a check cell; only those
    whose answer is a Python function (not a Triton kernel) if `functions_only`."""
    found = []
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.metadata.get("nbgrader", {}).get("grade"):
                for nb, check, arg in VISIBLE.findall(re.sub(r"### BEGIN HIDDEN.*", "", cell.source, flags=re.S)):
                    kernel = "kernel" in inspect.signature(visible_check(nb, check)).parameters
                    if not (functions_only and kernel):
                        found.append(pytest.param(path, nb, check, arg, id=f"{nb}.{check}"))
    return found


def visible_check(nb: str, check: str):
    return getattr(importlib.import_module(f"moba_edu.checks.{nb}"), check)


def hidden_check(nb: str, check: str):
    return getattr(importlib.import_module(f"moba_edu.checks.hidden.{nb}"), check)


def perturbed(x):
    """A wrong value of the same kind as x."""
    if isinstance(x, tuple):
        return tuple(perturbed(v) for v in x)
    if isinstance(x, set):
        return x | {-1}
    if isinstance(x, torch.Tensor):
        return ~x if x.dtype == torch.bool else x + 1
    return x + 1


def key(args) -> str:
    return repr([a.tolist() if isinstance(a, torch.Tensor) else a for a in args])


@pytest.mark.parametrize("nb", CHECK_MODULES)
def test_every_check_has_a_hidden_test(nb):
    visible = {n for n in dir(importlib.import_module(f"moba_edu.checks.{nb}")) if n.startswith("check_")}
    hidden = {n for n in dir(importlib.import_module(f"moba_edu.checks.hidden.{nb}")) if n.startswith("check_")}
    assert visible == hidden, f"moba_edu/checks/hidden/{nb}.py needs exactly {sorted(visible)}"


@pytest.mark.parametrize("path, nb, check, arg", exercises())
def test_hidden_test_accepts_the_solution_for_any_seed(path, nb, check, arg, tmp_path, monkeypatch):
    answer = getattr(solutions(path, tmp_path), arg)
    for seed in ("0", "1", "2"):
        monkeypatch.setenv("MOBA_EDU_HIDDEN_SEED", seed)
        hidden_check(nb, check)(answer)


@pytest.mark.parametrize("path, nb, check, arg", exercises(functions_only=True))
def test_hidden_test_rejects_an_answer_fitted_to_the_visible_cases(path, nb, check, arg, tmp_path):
    right = getattr(solutions(path, tmp_path), arg)
    seen = {}

    def recorded(*args):
        seen[key(args)] = right(*args)
        return seen[key(args)]

    visible_check(nb, check)(recorded)

    def fitted(*args):
        return seen[key(args)] if key(args) in seen else perturbed(right(*args))

    visible_check(nb, check)(fitted)  # passes the visible check
    with pytest.raises(Mistake, match="^hidden test: "):
        hidden_check(nb, check)(fitted)


GUARD = r'''
import functools, json, torch
from moba_edu import route, routing
from moba_edu.checks import nb02
from moba_edu.checks.grading import WriteItYourself

def cell(source):  # compiled as ipykernel compiles a notebook cell
    namespace = {"routing": routing, "route": route, "torch": torch}
    exec(compile(source, "/tmp/ipykernel_4242/2718281828.py", "exec"), namespace)
    return namespace

def outcome(run):
    try:
        run()
        return "ok"
    except WriteItYourself:
        return "refused"

own = """
def eligible(S, block_size):  # uses the library's num_blocks: another exercise's, allowed
    t, j = torch.arange(S)[:, None], torch.arange(routing.num_blocks(S, block_size))[None, :]
    return j < t // block_size
"""
print(json.dumps({
    "wrapped": outcome(lambda: nb02.check_eligible(cell("eligible = lambda S, bs: routing.eligible(S, bs)")["eligible"])),
    "alias": outcome(lambda: nb02.check_eligible(routing.eligible)),
    "partial": outcome(lambda: nb02.check_eligible(functools.partial(routing.eligible))),
    "own answer": outcome(lambda: nb02.check_eligible(cell(own)["eligible"])),
    "library in a cell": outcome(lambda: cell("routing.eligible(8, 2); route(*torch.randn(2, 1, 1, 8, 4), block_size=2, top_k=2)")),
}))
'''


def test_grading_refuses_the_librarys_answer_and_nothing_else():
    env = {"MOBA_EDU_GRADING": "1", "PATH": "", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", GUARD], capture_output=True, text=True, env=env, check=True).stdout
    assert json.loads(out.splitlines()[-1]) == {"wrapped": "refused", "alias": "refused", "partial": "refused",
                               "own answer": "ok", "library in a cell": "ok"}


def test_outside_grading_the_library_is_untouched():
    assert not grading.ACTIVE
    assert not hasattr(routing.eligible, "__wrapped__") and routing.eligible.__module__ == "moba_edu.routing"
    assert routing.num_blocks(10, 4) == math.ceil(10 / 4)
