"""Hidden tests for notebook 01 (attention from scratch): causal attention, a stable log-sum-exp."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import agree, close, generator, randint


def check_causal_attention(fn) -> None:
    gen = generator("nb01.check_causal_attention")
    for S, D, size in [(1, 4, 1.0), (randint(gen, 2, 20), randint(gen, 1, 8), 6.0), (randint(gen, 20, 40), 16, 1.0)]:
        q, k, v = (torch.randn(S, D, generator=gen) * size for _ in range(3))
        right = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
        agree(fn(q, k, v), right, lambda a, b: close(a, b, 1e-4, 1e-4), f"S={S}, D={D}, scores of size ~{size:g}")


def check_logsumexp(fn) -> None:
    gen = generator("nb01.check_logsumexp")
    R, n = randint(gen, 1, 5), randint(gen, 2, 40)
    x = torch.randn(R, n, generator=gen) * 20
    masked = x.masked_fill(torch.rand(R, n, generator=gen) < 0.8, float("-inf"))
    masked[:, randint(gen, 0, n - 1)] = 1.0  # every row keeps one finite entry
    for what, inputs in [("one column", x[:, :1]), (f"[{R}, {n}] scores of size ~20", x),
                         ("mostly -inf rows", masked), ("scores near -500", x - 500)]:
        agree(fn(inputs.clone()), torch.logsumexp(inputs, -1), lambda a, b: close(a, b, 1e-5, 1e-4), what)
