"""Grading integrity: while nbgrader grades, the library's answer to an exercise cannot stand in for
the student's.

Notebooks use the library freely, and so may a student's answer, except for the one function the
exercise asks them to write. A library function marked `@exercise("nb02.check_eligible")` raises
`WriteItYourself` when grading is on (the course's nbgrader configuration starts every grading kernel
with MOBA_EDU_GRADING=1) and

- it is called from notebook cell code while that exercise's check (visible or hidden) runs: the
  answer wraps the library, as in `eligible = lambda S, bs: routing.eligible(S, bs)`; or
- a check was handed it as the answer itself (`eligible = routing.eligible`, or a functools.partial).

A @triton.jit function (the teaching kernel's pieces) stays itself, since kernels inline it at compile
time and no Python frame sees it run: `exercise` only records it, and `refuse_library_kernel`, called by
`sandbox.run` before it launches a student's kernel, refuses an answer that is the library's function
or that calls it (by a global name, directly or through the answer's own @triton.jit helpers).

Calls from the library's own code, and from cells outside a check, are unaffected. Outside grading the
decorator returns the function unchanged: no cost, and nothing new for torch.compile to trace. What a
determined student can still do, and what a teacher can do about it: docs/teaching.md.
"""

from __future__ import annotations

import functools
import inspect
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


_KERNELS: list = []  # (library @triton.jit function, its checks' names), filled while grading


def _names(checks) -> set:
    """(visible module, hidden module, function name) of every check "nbNN.check_name"."""
    return {(f"{__package__}.{nb}", f"{__package__}.hidden.{nb}", name) for nb, name in (c.split(".") for c in checks)}


def _is_jit(fn) -> bool:
    """A @triton.jit function (JITFunction, or InterpretedFunction under TRITON_INTERPRET=1)."""
    return type(fn).__module__.startswith("triton.") and callable(getattr(fn, "fn", None))


def exercise(*checks: str):
    """Mark the library's version of the exercise(s) whose checks are `checks` ("nbNN.check_name")."""
    names = _names(checks)

    def mark(fn):
        if not ACTIVE:
            return fn
        if _is_jit(fn):
            _KERNELS.append((fn, names))
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


def refuse_library_kernel(check) -> None:
    """Raise WriteItYourself if the @triton.jit answer handed to the check running in frame `check` (its
    first argument) is the library's own function for that check, or calls it."""
    code = check.f_code
    module, answer = check.f_globals.get("__name__"), check.f_locals.get(code.co_varnames[0]) if code.co_argcount else None
    for kernel, names in _KERNELS:
        if any(module in (visible, hidden) and code.co_name == name for visible, hidden, name in names) \
                and _calls(answer, kernel, set()):
            raise WriteItYourself(f"this answer runs the library's {kernel.fn.__module__}.{kernel.fn.__name__}: the "
                                  "exercise asks you to write it yourself (graded answers may not call it)")


def _calls(answer, kernel, seen: set) -> bool:
    """Whether the @triton.jit function `answer` is `kernel` or reaches it through the global names its
    code reads (`teaching.attend_step` too: a module's attribute)."""
    if answer is kernel:
        return True
    if not _is_jit(answer) or id(answer) in seen:
        return False
    seen.add(id(answer))
    scope, names = answer.fn.__globals__, answer.fn.__code__.co_names
    found = [scope[name] for name in names if name in scope]
    found += [getattr(module, name) for module in found if inspect.ismodule(module) for name in names
              if hasattr(module, name)]
    return any(_calls(fn, kernel, seen) for fn in found)
