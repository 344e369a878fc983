"""Exercise checks, one module per notebook (`moba_edu.checks.nb02` for notebook 02, ...).

A check calls the student's function on fresh inputs, compares with the library's answer, and either
prints one line starting with "✓" or raises `Mistake` (an AssertionError) whose message names the
likely mistake ("the own block was treated as eligible", "`<=` where `<` belongs", ...), so the
student learns at once what to fix. Checks never print the expected answer wholesale.
"""


import contextlib


class Mistake(AssertionError):
    """Raised by a check: the message says what is wrong and the likely cause.

    In Jupyter it shows as that one line: IPython renders an exception that has `_render_traceback_`
    by the lines it returns, so the student never reads the check's own source in a traceback."""

    def _render_traceback_(self) -> list[str]:
        return [f"✗ {self}"]


def passed(message: str) -> None:
    print(f"✓ {message}")


def expect(condition: bool, mistake: str) -> None:
    """Raise `Mistake(mistake)` unless `condition` holds."""
    if not condition:
        raise Mistake(mistake)


def judge(answer, correct, mistakes: dict, same, otherwise: str) -> None:
    """Return if `same(answer, correct)`; else raise `Mistake` naming the first planted mistake whose
    result the answer equals (`mistakes`: {message: what that mistake computes}), or `otherwise`."""
    if same(answer, correct):
        return
    for message, wrong in mistakes.items():
        if same(answer, wrong):
            raise Mistake(message)
    raise Mistake(otherwise)


@contextlib.contextmanager
def forbidden(calls: dict):
    """While active, each named function raises Mistake(message) when called: {"torch.softmax": message}.
    Names are "torch.x", "torch.Tensor.x", "torch.special.x" or "torch.nn.functional.x"."""
    import torch

    owners = {"torch": torch, "torch.Tensor": torch.Tensor, "torch.special": torch.special,
              "torch.nn.functional": torch.nn.functional}
    saved = []
    for name, message in calls.items():
        owner_name, attr = name.rsplit(".", 1)
        owner = owners[owner_name]

        def refuse(*args, _message=message, **kwargs):
            raise Mistake(_message)

        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, refuse)
    try:
        yield
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)
