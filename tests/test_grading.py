"""Grading integrity: hidden tests (moba_edu.checks.hidden) and the guard on the library's answers
(moba_edu.checks.grading). The real nbgrader path is tested in test_nbgrader.py."""

import ast
import importlib
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


def imports_used(nb, code: str) -> list[str]:
    """The notebook's import statements that bind a name `code` uses (e.g. `load_rows` in notebook 06)."""
    found = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            for node in ast.parse(without_magics(cell.source)).body:
                if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                        re.search(rf"\b{(a.asname or a.name).split('.')[0]}\b", code) for a in node.names):
                    found.append(ast.unparse(node))
    return found


def without_magics(source: str) -> str:
    """A cell's source without IPython's magics and shell escapes (not Python)."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def solutions(path: Path, tmp_path: Path):
    """The notebook's solution cells, after the imports they use, as a module (imported from a file, so
    that triton.jit can read them)."""
    nb = nbformat.read(path, as_version=4)
    code = "\n\n".join(c.source for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution"))
    header = "import math\nimport torch\nimport torch.nn.functional as F\nimport triton\nimport triton.language as tl\n"
    (tmp_path / f"solutions_{path.stem}.py").write_text("\n".join([header, *imports_used(nb, code), "", code, ""]))
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module(f"solutions_{path.stem}")
    finally:
        sys.path.remove(str(tmp_path))


def exercises(functions_only=False):
    """(notebook path, nbNN, check name, answer name) of every visible check in a check cell; only those
    whose answer is a Python function (not a @triton.jit function or kernel: it runs inside Triton, where
    a Python table cannot) if `functions_only`."""
    found = []
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = nbformat.read(path, as_version=4).cells
        jit = "\n".join(c.source for c in cells if c.metadata.get("nbgrader", {}).get("solution"))
        for cell in cells:
            if cell.metadata.get("nbgrader", {}).get("grade"):
                for nb, check, arg in VISIBLE.findall(re.sub(r"### BEGIN HIDDEN.*", "", cell.source, flags=re.S)):
                    triton = re.search(rf"^@triton\.jit\s*\ndef {arg}\(", jit, re.M)
                    if not (functions_only and triton):
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
    if isinstance(x, list):
        return x + x[:1]
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


KERNEL_GUARD = r'''
import importlib, json, sys
from moba_edu.kernels import teaching  # sets TRITON_INTERPRET=1 without CUDA, before triton
from moba_edu.checks import nb06
from moba_edu.checks.hidden import nb06 as hidden_nb06
from moba_edu.checks.grading import WriteItYourself

sys.path.insert(0, sys.argv[1])
answers = importlib.import_module("answers")  # @triton.jit needs its source in a file

def outcome(run):
    try:
        run()
        return "ok"
    except WriteItYourself:
        return "refused"

print(json.dumps({
    "alias": outcome(lambda: nb06.check_attend_step(teaching.attend_step)),
    "alias, hidden test": outcome(lambda: hidden_nb06.check_attend_step(teaching.attend_step)),
    "wrapped": outcome(lambda: nb06.check_attend_step(answers.wrapped)),
    "wrapped twice": outcome(lambda: nb06.check_attend_step(answers.twice)),
    "own answer": outcome(lambda: nb06.check_attend_step(answers.own)),
}))
'''

ANSWERS = '''
import triton
import triton.language as tl
from moba_edu.kernels import teaching


@triton.jit
def wrapped(q, k, v, visible, m_i, l_i, acc, qk_scale):
    return teaching.attend_step(q, k, v, visible, m_i, l_i, acc, qk_scale)


@triton.jit
def twice(q, k, v, visible, m_i, l_i, acc, qk_scale):
    return wrapped(q, k, v, visible, m_i, l_i, acc, qk_scale)


@triton.jit
def own(q, k, v, visible, m_i, l_i, acc, qk_scale):
    s = tl.where(visible, tl.dot(q, tl.trans(k)) * qk_scale, -float("inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + tl.dot(p, v)
'''


def test_grading_refuses_the_librarys_triton_piece(tmp_path):
    """A @triton.jit answer is refused when it is the library's piece or calls it, even through a helper."""
    (tmp_path / "answers.py").write_text(ANSWERS)
    env = {"MOBA_EDU_GRADING": "1", "PATH": "", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", KERNEL_GUARD, str(tmp_path)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1]) == {"alias": "refused", "alias, hidden test": "refused",
                                                       "wrapped": "refused", "wrapped twice": "refused", "own answer": "ok"}
