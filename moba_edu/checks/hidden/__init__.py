"""Hidden tests: each exercise again, on inputs the student never saw (nbgrader's hidden tests).

The autograder cell of an exercise checked by `moba_edu.checks.nbNN.check_x` also runs
`moba_edu.checks.hidden.nbNN.check_x` between nbgrader's `### BEGIN HIDDEN TESTS` / `### END HIDDEN
TESTS` markers: the released notebook does not show those lines, and `nbgrader autograde` puts them
back. They catch answers fitted to the visible cases (a lookup table, a special case) and, with
`moba_edu.checks.grading`, answers that only call the library.

The inputs are drawn from a seed, MOBA_EDU_HIDDEN_SEED (0 unless the teacher sets another at grading
time), so reading this package shows how the inputs are made but not which ones a course grades with.
A failure is one line naming the case; the visible check has already named the likely mistake.
"""

from __future__ import annotations

import os
import zlib

import torch

from .. import Mistake


def generator(salt: str) -> torch.Generator:
    """A generator seeded by MOBA_EDU_HIDDEN_SEED and `salt` (one stream per exercise)."""
    seed = int(os.environ.get("MOBA_EDU_HIDDEN_SEED", "0"))
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(salt.encode()))


def randint(gen: torch.Generator, low: int, high: int) -> int:
    """A random int in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=gen))


def close(answer, right, rtol: float = 1e-5, atol: float = 1e-5) -> bool:
    """Tensors (or tuples of them) of equal shapes and values within tolerance; NaN matches NaN."""
    if isinstance(right, tuple):
        return (isinstance(answer, tuple) and len(answer) == len(right)
                and all(close(a, r, rtol, atol) for a, r in zip(answer, right)))
    return (isinstance(answer, torch.Tensor) and answer.shape == right.shape
            and torch.allclose(answer.double(), right.double(), rtol=rtol, atol=atol, equal_nan=True))


def equal(answer, right) -> bool:
    """Same shape and the same values (integers, booleans); plain numbers compare with ==."""
    if isinstance(right, torch.Tensor):
        return isinstance(answer, torch.Tensor) and answer.shape == right.shape and torch.equal(answer.long(), right.long())
    return answer == right


def agree(answer, right, same, case: str) -> None:
    """Raise a one-line `Mistake` naming `case` unless `same(answer, right)`."""
    if not same(answer, right):
        raise Mistake(f"hidden test: wrong answer for {case} (the visible cases passed: look at the edge cases)")
