"""Checks for notebook 04 (efficient MoBA in PyTorch): the log-sum-exp merge of two partial results,
and the number of (query, key) pairs MoBA computes.

Right answers come from the library (`efficient.merge_partials`, `cost.attended_pairs`); each
planted mistake is the same computation with one slip, so a wrong answer is named by its slip.
"""

from __future__ import annotations

import torch

from ..cost import attended_pairs
from ..efficient import merge_partials, partial_attention
from ..routing import own_block
from . import expect, judge, passed


def _close(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and a.shape == b.shape
            and torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-5, equal_nan=True))


def _two_partials(seed: int, shift: float = 0.0):
    """Partial results of 5 queries over two disjoint halves of 12 keys: (o_a, lse_a, o_b, lse_b)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, 4, generator=gen) for n in (5, 12, 12))
    o_a, lse_a = partial_attention(q, k[:7], v[:7], 0.9)
    o_b, lse_b = partial_attention(q, k[7:] * 1.5, v[7:], 0.9)
    return o_a, lse_a + shift, o_b, lse_b + shift


def check_merge_two(fn) -> None:
    """fn(o_a, lse_a, o_b, lse_b) -> (o, lse): o_* [M, D], lse_* [M] -> o [M, D], lse [M]."""
    o_a, lse_a, o_b, lse_b = _two_partials(seed=4)
    answer = fn(o_a, lse_a, o_b, lse_b)
    expect(isinstance(answer, tuple) and len(answer) == 2, "return a pair (o, lse)")
    o, lse = answer
    right_o, right_lse = merge_partials(torch.stack([o_a, o_b], 1), torch.stack([lse_a, lse_b], 1))
    z_a, z_b = lse_a.exp()[:, None], lse_b.exp()[:, None]
    judge(o, right_o, {
        "you averaged the outputs: weight each partial by its share of the softmax sum, exp(lse_i - lse)":
            (o_a + o_b) / 2,
        "weighted by lse_i instead of exp(lse_i): the partial sums of exponentials are Z_i = exp(lse_i)":
            (lse_a[:, None] * o_a + lse_b[:, None] * o_b) / (lse_a + lse_b)[:, None],
        "the weights do not sum to 1: divide Z_a o_a + Z_b o_b by Z_a + Z_b": z_a * o_a + z_b * o_b,
        "the weights are swapped: o_a gets exp(lse_a - lse), o_b gets exp(lse_b - lse)":
            (z_b * o_a + z_a * o_b) / (z_a + z_b),
    }, _close, "o is not the softmax over both key sets: o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b")
    judge(lse, right_lse, {
        "lse is the max of lse_a and lse_b: add log(exp(lse_a - m) + exp(lse_b - m)) to the max m":
            torch.maximum(lse_a, lse_b),
        "you added lse_a and lse_b: the sums of exponentials add, Z = Z_a + Z_b, so lse = log(Z_a + Z_b)":
            lse_a + lse_b,
        "lse of the mean, log((Z_a + Z_b) / 2): the union's sum is Z_a + Z_b, not their average":
            right_lse - torch.log(torch.tensor(2.0)),
    }, _close, "lse is not log(exp(lse_a) + exp(lse_b))")

    for empty, kept in (("b", "a"), ("a", "b")):
        o_a, lse_a, o_b, lse_b = _two_partials(seed=6)
        parts = {"a": (o_a, lse_a), "b": (o_b, lse_b)}
        parts[empty][1][:2] = float("-inf")  # two queries selected nothing in this set: an empty partial
        parts[empty][0][:2] = 0.0
        o, lse = fn(o_a, lse_a, o_b, lse_b)
        expect(not o.isnan().any() and not lse.isnan().any(),
               f"NaN where lse_{empty} = -inf (an empty key set): shift by the max m = max(lse_a, lse_b), not "
               f"by one partial's lse, so that an empty partial gets weight exp(-inf - m) = 0")
        expect(_close(o[:2], parts[kept][0][:2]) and _close(lse[:2], parts[kept][1][:2]),
               f"where lse_{empty} = -inf the merge should return partial {kept} unchanged")

    for side, lift in (("both", (200.0, 200.0)), ("a", (200.0, 0.0)), ("b", (0.0, 200.0))):
        o_a, lse_a, o_b, lse_b = _two_partials(seed=5)
        lse_a, lse_b = lse_a + lift[0], lse_b + lift[1]      # exp(200) overflows float32
        o, lse = fn(o_a, lse_a, o_b, lse_b)
        expect(torch.isfinite(o).all() and torch.isfinite(lse).all(),
               f"NaN or inf when lse_{side} is near 200 (the other near 0): exp(200) overflows float32; "
               "shift by the larger one, m = max(lse_a, lse_b), and use exp(lse_i - m) (or torch.logaddexp)"
               if side != "both" else "NaN or inf for lse near 200: you forgot to subtract the max before exp "
               "(exp(200) overflows float32); use m = max(lse_a, lse_b) and exp(lse_i - m), or torch.logaddexp")
        right_o, right_lse = merge_partials(torch.stack([o_a, o_b], 1), torch.stack([lse_a, lse_b], 1))
        expect(_close(o, right_o) and _close(lse, right_lse), f"wrong result when lse_{side} is near 200")
    passed("merge: weights exp(lse_i - lse), lse = logsumexp of the partial lse, stable for large and empty parts")


def _slipped_pairs(S: int, block_size: int, top_k: int, slip: str) -> int:
    """`attended_pairs` with one slip: "top_k routed", "uncapped" or "whole own block"."""
    t = torch.arange(S)
    own = own_block(S, block_size)
    own_keys = torch.full_like(t, block_size) if slip == "whole own block" else t - own * block_size + 1
    routed = {"top_k routed": own.clamp(max=top_k), "uncapped": torch.full_like(t, top_k - 1),
              "whole own block": own.clamp(max=top_k - 1)}[slip]
    return int((own_keys + block_size * routed).sum())


def check_attended_pairs(fn) -> None:
    """fn(S, block_size, top_k) -> int: the (query, key) pairs MoBA computes for one head."""
    for S, block_size, top_k in [(22, 4, 3), (64, 8, 1), (64, 8, 3), (100, 16, 4), (10, 4, 9), (3, 4, 2)]:
        answer = fn(S, block_size, top_k)
        expect(isinstance(answer, int) or (isinstance(answer, torch.Tensor) and answer.numel() == 1),
               f"return one number (an int), got {type(answer).__name__}")
        answer = int(answer)
        right = attended_pairs(S, block_size, top_k)
        expect(answer != S * (S + 1) // 2 or answer == right,
               f"{answer} is every causal pair, S (S + 1) / 2: count only the selected blocks' keys")
        mistakes = {
            "top_k counts the own block: a query routes to top_k - 1 blocks besides it, not top_k":
                _slipped_pairs(S, block_size, top_k, "top_k routed"),
            "query t has only t // block_size eligible blocks: it routes to min(top_k - 1, t // block_size)":
                _slipped_pairs(S, block_size, top_k, "uncapped"),
            "the own block is causal: query t reads t - own_start + 1 of its keys, not all block_size":
                _slipped_pairs(S, block_size, top_k, "whole own block"),
        }
        judge(answer, right, mistakes, lambda a, b: a == b,
              f"wrong count for S={S}, block_size={block_size}, top_k={top_k}: sum over queries t of "
              "(own-block keys up to t) + block_size x (routed blocks)")
    passed("attended pairs: the own block causally plus block_size keys per routed block")
