"""Grading integrity: while nbgrader grades, the library's answer to an exercise cannot stand in for
the student's.

Notebooks use the library freely, and so may a student's answer, except for the one function the
exercise asks them to write. A library function marked `@exercise("nb02.check_eligible")` raises
`WriteItYourself` when grading is on (the course's nbgrader configuration starts every grading kernel
with MOBA_EDU_GRADING=1) and

- it is called from notebook cell code while that exercise's check (visible or hidden) runs: the
  answer wraps the library, as in `eligible = lambda S, bs: routing.eligible(S, bs)`; or
- a check was handed it as the answer itself (`eligible = routing.eligible`, or a functools.partial).

Calls from the library's own code, and from cells outside a check, are unaffected. Outside grading the
decorator returns the function unchanged: no cost, and nothing new for torch.compile to trace. What a
determined student can still do, and what a teacher can do about it: docs/teaching.md.
"""

from __future__ import annotations

import functools
import os
import re
import sys

from . import Mistake

ACTIVE = os.environ.get("MOBA_EDU_GRADING") == "1"
# Code compiled from a notebook cell: ipykernel names it <tmp>/ipykernel_<pid>/<hash>.py; the
# IPython terminal names it <ipython-input-...>.
CELL_FILE = re.compile(r"(^<ipython-input-)|([/\\]ipykernel_\d+[/\\][^/\\]+\.py$)")


class WriteItYourself(Mistake):
    """The answer to an exercise is the library's own version of it."""


def exercise(*checks: str):
    """Mark the library's version of the exercise(s) whose checks are `checks` ("nbNN.check_name")."""
    names = {(f"{__package__}.{nb}", f"{__package__}.hidden.{nb}", name)
             for nb, name in (check.split(".") for check in checks)}

    def mark(fn):
        if not ACTIVE:
            return fn

        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            if _stands_in(guarded, names, sys._getframe(1)):
                raise WriteItYourself(f"this answer runs the library's {fn.__module__}.{fn.__name__}: the exercise "
                                      "asks you to write it yourself (graded answers may not call it)")
            return fn(*args, **kwargs)
        return guarded
    return mark


def _stands_in(guarded, names, caller) -> bool:
    """Whether this call of `guarded` is an answer standing in for the student's work."""
    if CELL_FILE.search(caller.f_code.co_filename):
        frame = caller.f_back
        while frame is not None:
            module = frame.f_globals.get("__name__")
            if any(module in (visible, hidden) and frame.f_code.co_name == name for visible, hidden, name in names):
                return True
            frame = frame.f_back
        return False
    # A check receives the answer as its first argument; it is this very function, perhaps wrapped.
    if not caller.f_globals.get("__name__", "").startswith(__package__) or not caller.f_code.co_argcount:
        return False
    answer = caller.f_locals.get(caller.f_code.co_varnames[0])
    while answer is not None:
        if answer is guarded:
            return True
        answer = getattr(answer, "func", None) or getattr(answer, "__func__", None)
    return False
