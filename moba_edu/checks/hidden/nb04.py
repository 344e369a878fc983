"""Hidden tests for notebook 04 (efficient MoBA): the log-sum-exp merge, attended pairs."""

from __future__ import annotations

import torch

from ...efficient import merge_partials, partial_attention
from ...cost import attended_pairs
from . import agree, close, generator, randint


def check_merge_two(fn) -> None:
    gen = generator("nb04.check_merge_two")
    for shift in (0.0, -300.0, 300.0):
        M, D, W = randint(gen, 1, 8), randint(gen, 1, 6), randint(gen, 2, 10)
        q, k, v = torch.randn(M, D, generator=gen), torch.randn(W, D, generator=gen), torch.randn(W, D, generator=gen)
        split = randint(gen, 1, W - 1)
        o_a, lse_a = partial_attention(q, k[:split], v[:split], 0.7)
        o_b, lse_b = partial_attention(q, k[split:] * 2, v[split:], 0.7)
        lse_a, lse_b = lse_a + shift, lse_b + shift
        lse_a[0], o_a[0] = float("-inf"), 0.0  # query 0 found nothing in set a
        right = merge_partials(torch.stack([o_a, o_b], 1), torch.stack([lse_a, lse_b], 1))
        agree(fn(o_a.clone(), lse_a.clone(), o_b.clone(), lse_b.clone()), right, close,
              f"{M} queries, D={D}, lse shifted by {shift:g}, an empty partial a in row 0")


def check_attended_pairs(fn) -> None:
    gen = generator("nb04.check_attended_pairs")
    cases = [(1, 1, 1), (16, 16, 4)] + [(randint(gen, 1, 300), randint(gen, 1, 40), randint(gen, 1, 10)) for _ in range(3)]
    for S, block_size, top_k in cases:
        agree(int(fn(S, block_size, top_k)), attended_pairs(S, block_size, top_k), lambda a, b: a == b,
              f"S={S}, block_size={block_size}, top_k={top_k}")
