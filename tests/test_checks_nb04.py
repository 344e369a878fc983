"""The exercise checks of notebook 04 accept the right answers and name each planted mistake."""

import math

import pytest
import torch

from moba_edu.checks import Mistake, nb04
from moba_edu.routing import own_block


def merge_two(o_a, lse_a, o_b, lse_b, slip=None):
    """The log-sum-exp merge of two partials, with one named slip or none."""
    if slip == "average":
        return (o_a + o_b) / 2, torch.logaddexp(lse_a, lse_b)
    m = torch.maximum(lse_a, lse_b)
    if slip == "no max":
        m = torch.zeros_like(m)
    if slip == "shift by b":  # right unless lse_b = -inf or lse_a >> lse_b
        m = lse_b
    if slip == "shift by a":  # right unless lse_a = -inf or lse_b >> lse_a
        m = lse_a
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    lse = m + torch.log(w_a + w_b)
    if slip == "lse sum":
        lse = lse_a + lse_b
    return (w_a[:, None] * o_a + w_b[:, None] * o_b) / (w_a + w_b)[:, None], lse


def merge_by_ratio(o_a, lse_a, o_b, lse_b):
    """Weights from r = exp(lse_a - lse_b), empty partials special-cased: overflows when lse_a >> lse_b."""
    r = torch.exp(lse_a - lse_b)
    o = torch.where((lse_b == -math.inf)[:, None], o_a, (r[:, None] * o_a + o_b) / (r + 1)[:, None])
    o = torch.where((lse_a == -math.inf)[:, None], o_b, o)
    lse = torch.where(lse_b == -math.inf, lse_a, lse_b + torch.log1p(r))
    return o, torch.where(lse_a == -math.inf, lse_b, lse)


def test_merge_two_names_a_one_sided_overflow():
    with pytest.raises(Mistake, match="when lse_a is near 200"):
        nb04.check_merge_two(merge_by_ratio)


def attended_pairs(S, block_size, top_k, slip=None):
    t = torch.arange(S)
    own = own_block(S, block_size)
    routed = own.clamp(max=top_k if slip == "top_k" else top_k - 1)
    own_keys = torch.full_like(t, block_size) if slip == "whole own" else t - own * block_size + 1
    return int((own_keys + block_size * routed).sum())


def test_merge_two_accepts_the_right_merge(capsys):
    nb04.check_merge_two(merge_two)
    assert capsys.readouterr().out.startswith("✓")


@pytest.mark.parametrize("slip, message", [
    ("average", "you averaged the outputs"),
    ("no max", "forgot to subtract the max"),
    ("lse sum", "you added lse_a and lse_b"),
    ("shift by b", "NaN where lse_b = -inf"),
    ("shift by a", "NaN where lse_a = -inf"),
])
def test_merge_two_names_the_mistake(slip, message):
    with pytest.raises(Mistake, match=message):
        nb04.check_merge_two(lambda *args: merge_two(*args, slip=slip))


def test_attended_pairs_accepts_the_right_count(capsys):
    nb04.check_attended_pairs(attended_pairs)
    assert capsys.readouterr().out.startswith("✓")


@pytest.mark.parametrize("slip, message", [
    ("top_k", "top_k counts the own block"),
    ("whole own", "the own block is causal"),
])
def test_attended_pairs_names_the_mistake(slip, message):
    with pytest.raises(Mistake, match=message):
        nb04.check_attended_pairs(lambda *args: attended_pairs(*args, slip=slip))


def test_attended_pairs_rejects_the_dense_count():
    with pytest.raises(Mistake, match="every causal pair"):
        nb04.check_attended_pairs(lambda S, block_size, top_k: S * (S + 1) // 2)


@pytest.mark.parametrize("check", [nb04.check_merge_two, nb04.check_attended_pairs])
def test_an_unanswered_exercise_says_so(check):
    def unanswered(*args):
        raise NotImplementedError()
    with pytest.raises(NotImplementedError):
        check(unanswered)
