"""Hidden tests for notebook 09 (decoding with a KV cache): routing a token from the cached page means,
merging flash-decoding's split partials."""

from __future__ import annotations

import math

import torch

from ...efficient import partial_attention
from ..nb09 import _as_set, _right_merge, right_route
from . import agree, close, generator, randint


def check_route_token(fn) -> None:
    gen = generator("nb09.check_route_token")
    for _ in range(4):
        block_size, top_k, D = randint(gen, 1, 16), randint(gen, 1, 6), randint(gen, 1, 16)
        t = randint(gen, 0, 12 * block_size)
        P = (t + 1) // block_size                   # full pages once token t is cached
        q_t, means = torch.randn(D, generator=gen), torch.randn(P, D, generator=gen)
        if P > t // block_size:                     # t ends its block: make that (ineligible) block look best
            means[t // block_size] = 3 * q_t / q_t.norm()
        agree(_as_set(fn(q_t.clone(), means.clone(), t, block_size, top_k)), right_route(q_t, means, t, block_size, top_k),
              lambda a, b: a == b, f"t={t}, block_size={block_size}, top_k={top_k}, D={D}")


def check_merge_splits(fn) -> None:
    gen = generator("nb09.check_merge_splits")
    for shift in (0.0, -300.0, 300.0):
        P, D = randint(gen, 1, 6), randint(gen, 1, 8)
        q = torch.randn(1, D, generator=gen)
        parts = [partial_attention(q, torch.randn(n, D, generator=gen) * 2, torch.randn(n, D, generator=gen), D ** -0.5)
                 for n in (randint(gen, 1, 8) for _ in range(P))]
        o, lse = torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts]) + shift
        empty = torch.rand(P, generator=gen) < 0.4
        empty[0] = False                            # the own block's split always has keys
        o[empty], lse[empty] = math.nan, -math.inf
        answer = fn(o.clone(), lse.clone())
        right = _right_merge(o, lse)
        agree(answer if not isinstance(answer, tuple) else (answer[0], torch.as_tensor(answer[1]).reshape(())),
              right, close, f"{P} splits, D={D}, lse shifted by {shift:g}, {int(empty.sum())} empty")
