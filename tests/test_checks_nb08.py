"""The exercise checks of notebook 08 accept the right answers and name each planted mistake."""

import pytest
import torch
import torch.nn.functional as F

from moba_edu.checks import Mistake, nb08


def hybrid_pattern(n_layer, last_full, slip=None):
    n_moba = n_layer - last_full
    if slip == "full first":
        return ["full"] * last_full + ["moba"] * n_moba
    if slip == "swapped":
        return ["full"] * n_moba + ["moba"] * last_full
    if slip == "one more moba":
        return ["moba"] * (n_moba + 1) + ["full"] * (last_full - 1)
    return ["moba"] * n_moba + ["full"] * last_full


def trailing_loss(logits, targets, last, slip=None):
    losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    picked = {"all": losses, "first": losses[:, :last], "rows": losses[-last:]}.get(slip, losses[:, -last:])
    return picked.sum().item() if slip == "sum" else picked.mean().item()


def test_hybrid_pattern_accepts_the_right_pattern(capsys):
    nb08.check_hybrid_pattern(hybrid_pattern)
    assert capsys.readouterr().out.startswith("✓")


@pytest.mark.parametrize("slip, message", [
    ("full first", "come last"),
    ("swapped", "swapped"),
    ("one more moba", "off by one"),
])
def test_hybrid_pattern_names_the_mistake(slip, message):
    with pytest.raises(Mistake, match=message):
        nb08.check_hybrid_pattern(lambda n, last: hybrid_pattern(n, last, slip))


def test_hybrid_pattern_rejects_a_non_list():
    with pytest.raises(Mistake, match="return a list"):
        nb08.check_hybrid_pattern(lambda n, last: "moba" * n)


def test_trailing_loss_accepts_the_right_loss(capsys):
    nb08.check_trailing_loss(trailing_loss)
    assert capsys.readouterr().out.startswith("✓")
    nb08.check_trailing_loss(lambda *a: torch.tensor(trailing_loss(*a)))  # a 0-dim tensor is fine


@pytest.mark.parametrize("slip, message", [
    ("all", "averaged every position"),
    ("first", "first `last` positions"),
    ("sum", "you summed"),
    ("rows", "last rows of the batch"),
])
def test_trailing_loss_names_the_mistake(slip, message):
    with pytest.raises(Mistake, match=message):
        nb08.check_trailing_loss(lambda *a: trailing_loss(*a, slip=slip))


def test_trailing_loss_rejects_a_list():
    with pytest.raises(Mistake, match="one number"):
        nb08.check_trailing_loss(lambda logits, targets, last: [0.0])
