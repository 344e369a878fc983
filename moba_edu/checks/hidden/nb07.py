"""Hidden tests for notebook 07 (MoBA backward): a tile's backward, a routed block's dK and dV."""

from __future__ import annotations

import torch

from ..nb07 import _autograd, _block_grads, _tile
from . import agree, close, generator, randint


def check_attention_backward(fn) -> None:
    gen = generator("nb07.check_attention_backward")
    for _ in range(2):
        M, N, D = randint(gen, 1, 10), randint(gen, 1, 12), randint(gen, 1, 8)
        scale = D ** -0.5
        q, k, v, o, lse, do, mask = _tile(gen, M, N, D, scale)
        agree(fn(q, k, v, o, lse, do, mask, scale), tuple(_autograd(q, k, v, do, mask, scale)),
              lambda a, b: close(a, b, 1e-6, 1e-8), f"a tile of {M} queries, {N} keys, D={D}")


def check_block_grads(fn) -> None:
    gen = generator("nb07.check_block_grads")
    g, S, W, D = randint(gen, 1, 4), randint(gen, 1, 16), randint(gen, 1, 8), randint(gen, 1, 6)
    scale = D ** -0.5
    q, do = (torch.randn(g, S, D, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(W, D, generator=gen, dtype=torch.float64) for _ in range(2))
    chose = torch.rand(g, S, generator=gen) < 0.5
    lse = torch.randn(g, S, generator=gen, dtype=torch.float64).abs() + 2  # from a larger key set
    delta = torch.randn(g, S, generator=gen, dtype=torch.float64)
    args = (q, do, lse, delta, chose, k, v)
    agree(fn(*(x.clone() for x in args), scale), _block_grads(*args, scale),
          lambda a, b: close(a, b, 1e-6, 1e-8), f"{g} heads, {S} queries, a block of {W} keys, D={D}")
