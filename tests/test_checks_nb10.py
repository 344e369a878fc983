"""The exercise checks of notebook 10 accept the right answers and name each planted mistake."""

import math

import numpy as np
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
        "no delta": m * math.sqrt(d / (2 * B)),
        "no sqrt": m * delta * d / (2 * B),
        "probability": 0.5 * (1 + math.erf(m * delta * math.sqrt(d / (2 * B)) / math.sqrt(2))),
    }[slip]


def test_block_max_accepts_the_right_answer(capsys):
    nb10.check_block_max(block_max)
    assert capsys.readouterr().out.startswith("✓")


@pytest.mark.parametrize("slip, message", [
    ("mean", "you took the mean"), ("abs", "max of |k|"), ("zero pad", "zero padding"), ("over D", "shape")])
def test_block_max_names_the_mistake(slip, message):
    with pytest.raises(Mistake, match=message):
        nb10.check_block_max(lambda k, b: block_max(k, b, slip=slip))


def test_block_max_reports_a_view_that_assumes_whole_blocks():
    """k.view(-1, block_size, D) fails when S does not divide: one line naming the short last block."""
    with pytest.raises(Mistake, match="the last block may be short"):
        nb10.check_block_max(lambda k, b: k.view(-1, b, k.shape[1]).amax(1))


def test_snr_accepts_the_right_answer(capsys):
    nb10.check_snr(snr_of)
    assert capsys.readouterr().out.startswith("✓")


@pytest.mark.parametrize("slip, message", [
    ("no 2", "forgot the 2"), ("upside down", "upside down"), ("1/B", "not 1/B"), ("no m", "n_relevant ignored"),
    ("no delta", "delta left out"), ("no sqrt", "no square root"), ("probability", "check the signal")])
def test_snr_names_the_mistake(slip, message):
    with pytest.raises(Mistake, match=message) as caught:
        nb10.check_snr(lambda *args: snr_of(*args, slip=slip))
    assert "sqrt(2 / (d B))" not in str(caught.value)      # a mistake is named, the formula not given away


def test_numpy_numbers_are_answers(capsys):
    nb10.check_snr(lambda *args: np.float32(snr_of(*args)))
    nb10.check_largest_block(lambda *args: np.int64(largest_block(*args)))
    assert capsys.readouterr().out.count("✓") == 2


def test_snr_rejects_a_non_number():
    with pytest.raises(Mistake, match="return a number"):
        nb10.check_snr(lambda *args: "2.0")


def largest_block(delta, d, sizes, min_snr, slip=None):
    """The largest block size reaching min_snr, with one named slip or none."""
    if slip == "first failing":
        return min(B for B in sizes if snr_of(delta, d, B, 1) < min_snr)
    ok = [B for B in sizes if snr_of(delta, d, B, 1, slip="no 2" if slip == "no 2" else None) >= min_snr]
    return min(ok) if slip == "smallest" else max(ok)


def test_largest_block_accepts_the_right_answer(capsys):
    nb10.check_largest_block(largest_block)
    assert capsys.readouterr().out.startswith("✓")


@pytest.mark.parametrize("slip, message", [("smallest", "routes best"), ("no 2", "one size too large"),
                                           ("first failing", "one size too large")])
def test_largest_block_names_the_mistake(slip, message):
    with pytest.raises(Mistake, match=message):
        nb10.check_largest_block(lambda *args: largest_block(*args, slip=slip))


def test_largest_block_rejects_a_size_not_offered():
    with pytest.raises(Mistake, match="return one of the block sizes"):
        nb10.check_largest_block(lambda *args: 3)
