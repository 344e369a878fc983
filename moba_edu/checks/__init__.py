"""Exercise checks, one module per notebook (`moba_edu.checks.nb02` for notebook 02, ...).

A check calls the student's function on fresh inputs, compares with the library's answer, and either
prints one line starting with "✓" or raises `Mistake` (an AssertionError) whose message names the
likely mistake ("the own block was treated as eligible", "`<=` where `<` belongs", ...), so the
student learns at once what to fix. Checks never print the expected answer wholesale.
"""


class Mistake(AssertionError):
    """Raised by a check: the message says what is wrong and the likely cause."""


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
