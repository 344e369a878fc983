"""Checks for notebook 01 (attention from scratch): causal softmax attention and a stable log-sum-exp.

The right answers come from PyTorch (`scaled_dot_product_attention`, `torch.logsumexp`); each planted
mistake is the same computation with one slip, so a wrong answer is named by the slip it reproduces.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import Mistake, expect, forbidden, judge, passed


def _attention(q, k, v, allowed, scale, mask_after_softmax=False):
    """Softmax attention of q [S, D] over k, v [S, D] where `allowed` [S, S] (bool) keeps key s for query t."""
    scores = (q @ k.T) * scale
    if mask_after_softmax:
        return (scores.softmax(-1) * allowed) @ v
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def _same_rows(answer, wrong) -> bool:
    """Equal where `wrong` is defined: a row of NaN there (no key left) matches whatever fills it."""
    if answer.shape != wrong.shape:
        return False
    rows = ~wrong.isnan().any(-1)
    return torch.allclose(answer[rows].double(), wrong[rows].double(), rtol=1e-4, atol=1e-5)


def check_causal_attention(fn) -> None:
    """fn(q, k, v) -> o: causal softmax attention; q, k, v and o are [S, D] float32."""
    S, D = 7, 8
    q, k, v = torch.randn(3, S, D, generator=torch.Generator().manual_seed(1))
    answer = fn(q, k, v)
    expect(isinstance(answer, torch.Tensor), "return a tensor: the output o = softmax(...) @ v")
    expect(answer.shape != (S, S), "got the [S, S] attention weights: multiply them by v to get o [S, D]")
    expect(answer.shape == (S, D), f"o should have shape [S, D] = [{S}, {D}], got {list(answer.shape)}")
    t, s = torch.arange(S)[:, None], torch.arange(S)[None, :]
    right = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
    scale = 1 / math.sqrt(D)
    judge(answer, right, {
        "the mask was applied after the softmax: set future scores to -inf *before* it, so each row "
        "still sums to 1": _attention(q, k, v, s <= t, scale, mask_after_softmax=True),
        "forgot the 1/sqrt(d) scale on the scores": _attention(q, k, v, s <= t, 1.0),
        "scaled by 1/d: the scale is 1/sqrt(d)": _attention(q, k, v, s <= t, 1 / D),
        "masked the diagonal (`<` instead of `<=` in the causal mask): query t must see its own key, "
        "s <= t": _attention(q, k, v, s < t, scale),
        "one future key leaks: the mask keeps s <= t + 1 (check the diagonal offset of tril/triu)":
            _attention(q, k, v, s <= t + 1, scale),
        "the mask is flipped: query t sees keys after it; keep s <= t (the lower triangle)":
            _attention(q, k, v, s >= t, scale),
        "no causal mask: query t must not see keys s > t": _attention(q, k, v, s >= 0, scale),
    }, _same_rows, "o differs from causal softmax attention (compare with F.scaled_dot_product_attention)")
    large = fn(q * 10, k * 10, v)  # scores of a few hundred: exp overflows float32 past 88.7
    expect(bool(large.isfinite().all()), "the softmax overflowed on large scores (inf or NaN): subtract "
           "each row's maximum before exp (torch.softmax does this for you)")
    expect(torch.allclose(large, F.scaled_dot_product_attention(q[None] * 10, k[None] * 10, v[None],
                                                                is_causal=True)[0], rtol=1e-3, atol=1e-3),
           "right on small scores but wrong on large ones: is the softmax stable (row max subtracted)?")
    passed("causal softmax attention matches F.scaled_dot_product_attention(is_causal=True)")


_LIBRARY_LSE = "you called {}: write the log-sum-exp yourself from x.max, torch.exp and torch.log"
_NO_LIBRARY_LSE = {name: _LIBRARY_LSE.format(name) for name in (
    "torch.logsumexp", "torch.Tensor.logsumexp", "torch.special.logsumexp", "torch.logaddexp",
    "torch.log_softmax", "torch.Tensor.log_softmax", "torch.nn.functional.log_softmax")}


def check_logsumexp(fn) -> None:
    """fn(x) -> log(sum(exp(x))) over the last dimension, stably: x [R, n] float32 -> [R]; written
    without torch.logsumexp (calling it, or log_softmax, is named as the mistake)."""
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(2)) * 3
    with forbidden(_NO_LIBRARY_LSE):
        answer = fn(x)
    expect(isinstance(answer, torch.Tensor), "return a tensor")
    expect(answer.shape == (4,), f"reduce the last dimension: x [4, 10] -> [4], got {list(answer.shape)}"
           + (" (drop the kept dimension)" if answer.shape == (4, 1) else ""))
    m = x.max(-1).values
    judge(answer, torch.logsumexp(x, -1), {
        "you averaged: log-sum-exp sums exp(x); it is log(mean(exp(x))) + log(n)": torch.logsumexp(x, -1) - math.log(10),
        "returned only the maximum: add log(sum(exp(x - max)))": m,
        "subtracted the max but did not add it back: lse = max + log(sum(exp(x - max)))":
            torch.logsumexp(x - m[:, None], -1),
    }, lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5), "wrong log-sum-exp on ordinary inputs")
    for shift, what in [(1000.0, "overflowed: exp(1000) is inf"), (-1000.0, "underflowed: exp(-1000) is 0, log 0 is -inf")]:
        with forbidden(_NO_LIBRARY_LSE):
            shifted = fn(x + shift)
        expect(bool(shifted.isfinite().all()), f"exp {what} in float32: subtract each row's maximum before "
               "exp and add it back after the log")
        expect(torch.allclose(shifted, answer + shift, rtol=1e-5, atol=1e-3),
               f"lse(x + c) should be lse(x) + c; wrong for c = {shift:g}")
    masked = x.masked_fill(torch.arange(10) >= 6, float("-inf"))  # masked scores, as in causal attention
    try:
        with forbidden(_NO_LIBRARY_LSE):
            from_student = fn(masked)
        ok = torch.allclose(from_student, torch.logsumexp(masked, -1), rtol=1e-5, atol=1e-5)
    except NotImplementedError:  # a RuntimeError too: not an answer to name
        raise
    except RuntimeError as err:
        raise Mistake(f"failed on -inf entries (masked scores): {err}") from err
    expect(ok, "entries of -inf (masked scores) must count as exp(-inf) = 0")
    passed("stable log-sum-exp, written by hand: right for huge, tiny and masked scores")
