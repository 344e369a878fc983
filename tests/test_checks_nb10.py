"""The exercise checks of notebook 10 accept the right answers and name each planted mistake."""

import math

import pytest
import torch

from moba_edu.checks import Mistake, nb10


def block_max(k, block_size, slip=None):
    """Max-pooled block representatives of k [S, D], with one named slip or none."""
    blocks = [k[j:j + block_size] for j in range(0, k.shape[0], block_size)]
    if slip == "zero pad":
        blocks = [torch.nn.functional.pad(b, (0, 0, 0, block_size - len(b))) for b in blocks]
    if slip == "over D":
        return torch.stack([b.amax(1).max() for b in blocks])
    pool = {"mean": lambda b: b.mean(0), "abs": lambda b: b.abs().amax(0)}.get(slip, lambda b: b.amax(0))
    return torch.stack([pool(b) for b in blocks])


def snr_of(delta, d, B, m, slip=None):
    """The routing SNR, with one named slip or none."""
    return {
        None: m * delta * math.sqrt(d / (2 * B)),
        "no 2": m * delta * math.sqrt(d / B),
        "upside down": m * delta * math.sqrt(B / (2 * d)),
        "1/B": m * delta * math.sqrt(d / 2) / B,
        "no m": delta * math.sqrt(d / (2 * B)),
    }[slip]


def test_block_max_accepts_the_right_answer(capsys):
    nb10.check_block_max(block_max)
    assert capsys.readouterr().out.startswith("✓")


@pytest.mark.parametrize("slip, message", [
    ("mean", "you took the mean"), ("abs", "max of |k|"), ("zero pad", "zero padding"), ("over D", "shape")])
def test_block_max_names_the_mistake(slip, message):
    with pytest.raises(Mistake, match=message):
        nb10.check_block_max(lambda k, b: block_max(k, b, slip=slip))


def test_snr_accepts_the_right_answer(capsys):
    nb10.check_snr(snr_of)
    assert capsys.readouterr().out.startswith("✓")


@pytest.mark.parametrize("slip, message", [
    ("no 2", "forgot the 2"), ("upside down", "upside down"), ("1/B", "not 1/B"), ("no m", "n_relevant ignored")])
def test_snr_names_the_mistake(slip, message):
    with pytest.raises(Mistake, match=message):
        nb10.check_snr(lambda *args: snr_of(*args, slip=slip))


def test_snr_rejects_a_non_number():
    with pytest.raises(Mistake, match="return a number"):
        nb10.check_snr(lambda *args: "2.0")


def largest_block(delta, d, sizes, min_snr, slip=None):
    """The largest block size reaching min_snr, with one named slip or none."""
    ok = [B for B in sizes if snr_of(delta, d, B, 1, slip="no 2" if slip == "no 2" else None) >= min_snr]
    return min(ok) if slip == "smallest" else max(ok)


def test_largest_block_accepts_the_right_answer(capsys):
    nb10.check_largest_block(largest_block)
    assert capsys.readouterr().out.startswith("✓")


@pytest.mark.parametrize("slip, message", [("smallest", "routes best"), ("no 2", "forgot the 2")])
def test_largest_block_names_the_mistake(slip, message):
    with pytest.raises(Mistake, match=message):
        nb10.check_largest_block(lambda *args: largest_block(*args, slip=slip))


def test_largest_block_rejects_a_size_not_offered():
    with pytest.raises(Mistake, match="return one of the block sizes"):
        nb10.check_largest_block(lambda *args: 3)
