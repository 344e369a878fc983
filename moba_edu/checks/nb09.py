"""Checks for notebook 09 (decoding with a KV cache): routing one new token from the cached page means,
and merging the split partials of flash-decoding by log-sum-exp.

Right answers come from the library (`routing.select_blocks` over `routing.eligible` gates,
`efficient.merge_partials`); each planted mistake is the same computation with one slip, so a wrong
answer is named by its slip.
"""

from __future__ import annotations

import torch

from ..efficient import merge_partials, partial_attention
from ..routing import eligible, select_blocks
from . import expect, judge, passed


def _as_set(answer) -> set:
    if isinstance(answer, torch.Tensor):
        expect(answer.dim() <= 1 and not answer.is_floating_point(),
               f"return a 1-D tensor of block numbers (integers), got {answer.dtype} of shape {tuple(answer.shape)}")
        answer = answer.tolist()
    expect(isinstance(answer, (list, tuple)), f"return a 1-D tensor of block numbers, got {type(answer).__name__}")
    return {int(j) for j in answer}


def _top(gates: torch.Tensor, n: int, largest: bool = True) -> set:
    n = max(0, min(n, gates.numel()))
    return set(gates.topk(n, largest=largest).indices.tolist())


def right_route(q_t, means, t: int, block_size: int, top_k: int) -> set:
    """The routed blocks of the token at position t (own block left out), by the library's router."""
    n_blocks = t // block_size + 1                                   # blocks 0 .. own; select_blocks counts own
    scores = torch.full((1, n_blocks), float("-inf"))
    scores[0, :min(means.shape[0], n_blocks)] = (means.float() @ q_t.float())[:n_blocks]
    gates = scores.masked_fill(~eligible(1, block_size, start=t, n_blocks=n_blocks), float("-inf"))
    routed = select_blocks(gates, block_size, top_k, start=t)[0, 1:]
    return set(routed[routed >= 0].tolist())


def check_route_token(fn) -> None:
    """fn(q_t [D], means float32 [P, D], t, block_size, top_k) -> 1-D int tensor of routed blocks, any order.
    means holds the stored means of the sequence's P full pages, in block order."""
    gen = torch.Generator().manual_seed(9)
    for t, block_size, top_k in [(23, 4, 3), (21, 4, 3), (40, 8, 2), (30, 4, 20), (2, 4, 3), (17, 4, 1)]:
        P = (t + 1) // block_size                   # full pages once token t is cached (its own, if t ends it)
        q_t, means = torch.randn(16, generator=gen), torch.randn(P, 16, generator=gen)
        if P > t // block_size:                     # t ends its block: make that (ineligible) block look best
            means[t // block_size] = 3 * q_t / q_t.norm()
        answer = _as_set(fn(q_t, means, t, block_size, top_k))
        right = right_route(q_t, means, t, block_size, top_k)
        own = t // block_size
        scores = means @ q_t
        judge(answer, right, {
            "the own block is not eligible: its mean was taken over keys after t (route only j < t // block_size)":
                _top(scores[:own + 1], top_k - 1),
            "top_k counts the own block: route top_k - 1 blocks besides it, not top_k": _top(scores[:own], top_k),
            "you picked the smallest gates: route the blocks with the largest q . mean": _top(scores[:own], top_k - 1, False),
            "the block just before the own block is eligible too: j < t // block_size, not j < t // block_size - 1":
                _top(scores[:max(own - 1, 0)], top_k - 1),
        }, lambda a, b: a == b,
            f"wrong blocks for t={t}, block_size={block_size}, top_k={top_k}: the top_k - 1 largest "
            "q_t . mean(j) over j < t // block_size (fewer if fewer are eligible)")
    passed("routing from cached means: the top_k - 1 best full blocks wholly before the token's own block")


def _splits(seed: int, shift: float = 0.0, empty=()):
    """Flash-decoding partials of one query over 4 disjoint pages of 6 keys: o [4, 8], lse [4]; the
    splits in `empty` chose no page (lse -inf, o NaN: never written)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(1, 8, generator=gen), torch.randn(4, 6, 8, generator=gen), torch.randn(4, 6, 8, generator=gen)
    o, lse = partial_attention(q.expand(4, 1, 8), k * torch.tensor([0.5, 1.0, 1.5, 2.0])[:, None, None], v, 0.7)
    o, lse = o[:, 0], lse[:, 0] + shift
    for i in empty:
        o[i], lse[i] = float("nan"), float("-inf")
    return o, lse


def _right_merge(o, lse):
    return merge_partials(torch.where(lse[:, None] > float("-inf"), o, 0.0), lse)


def _close(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and a.shape == b.shape
            and torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-5, equal_nan=True))


def check_merge_splits(fn) -> None:
    """fn(o [P, D], lse [P]) -> (o [D], lse scalar tensor): the exact softmax over the union of the splits."""
    o_p, lse_p = _splits(seed=1)
    answer = fn(o_p.clone(), lse_p.clone())
    expect(isinstance(answer, tuple) and len(answer) == 2, "return a pair (o, lse)")
    o, lse = answer
    right_o, right_lse = _right_merge(o_p, lse_p)
    z = lse_p.exp()[:, None]
    judge(o, right_o, {
        "you averaged the splits: weight each by its share of the softmax sum, exp(lse_i - lse)": o_p.mean(0),
        "weighted by lse_i instead of exp(lse_i): a split's sum of exponentials is Z_i = exp(lse_i)":
            (lse_p[:, None] * o_p).sum(0) / lse_p.sum(),
        "the weights do not sum to 1: divide sum_i Z_i o_i by sum_i Z_i": (z * o_p).sum(0),
    }, _close, "o is not the softmax over all splits: o = sum_i exp(lse_i - lse) o_i")
    judge(torch.as_tensor(lse).reshape(()), right_lse, {
        "lse is the max of the splits' lse: add log(sum_i exp(lse_i - m)) to the max m": lse_p.max(),
        "you added the lse: the sums of exponentials add, so lse = log(sum_i exp(lse_i))": lse_p.sum(),
    }, _close, "lse is not log(sum_i exp(lse_i))")

    o_p, lse_p = _splits(seed=2, shift=300.0)             # exp(300) overflows float32
    o, lse = fn(o_p.clone(), lse_p.clone())
    expect(torch.isfinite(o).all() and torch.isfinite(torch.as_tensor(lse)).all(),
           "NaN or inf for lse near 300: subtract the largest lse m before exp, exp(lse_i - m)")
    expect(_close(o, _right_merge(o_p, lse_p)[0]), "wrong result for large lse (near 300)")

    o_p, lse_p = _splits(seed=3, empty=(1, 3))
    o, lse = fn(o_p.clone(), lse_p.clone())
    expect(not o.isnan().any() and not torch.as_tensor(lse).isnan().any(),
           "NaN from an empty split (lse = -inf, o never written): give it weight 0 and leave its o out "
           "(0 x NaN is NaN), as the kernel skips loading it")
    right_o, right_lse = _right_merge(o_p, lse_p)
    expect(_close(o, right_o) and _close(torch.as_tensor(lse).reshape(()), right_lse),
           "wrong result with empty splits: merge only the splits with lse > -inf")
    passed("merge of split partials: weights exp(lse_i - lse), stable for large lse, empty splits left out")
