"""Hidden tests for notebook 07 (MoBA backward): a tile's backward, a routed block's dK and dV, and the
same in Triton (the teaching kernel's dkdv_step)."""

from __future__ import annotations

import torch

from .. import sandbox
from ..nb06 import _close
from ..nb07 import _autograd, _block_grads, _tile, _tile_grads
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


def check_dkdv_step(dkdv_step) -> None:
    from ...kernels import teaching  # here, as in the visible checks: importing the checks needs no Triton

    gen = generator("nb07.check_dkdv_step")
    D, W = 2 ** randint(gen, 2, 4), randint(gen, 1, 16)
    key0 = W * randint(gen, 0, 2)
    S, scale = key0 + W + randint(gen, 0, 24), 0.1 + torch.rand(1, generator=gen).item()
    q, k = (torch.randint(-16, 17, (n, D), generator=gen).double() / 8 for n in (S, W))  # exact in TF32
    do, v = (torch.randn(n, D, generator=gen, dtype=torch.float64) for n in (S, W))
    later = torch.arange(key0 + W, S)
    rows = torch.cat([torch.arange(key0, key0 + W), later[torch.rand(len(later), generator=gen) < 0.5]])
    lse, delta, dk_right, dv_right = _tile_grads(q, do, rows, k, v, key0, scale, seed=randint(gen, 0, 10**6))
    dev, answer = sandbox.device(), []
    sandbox.run(lambda: answer.extend(x.cpu() for x in teaching.block_grads(
        *(x.to(dev) for x in (q, do, lse, delta, rows, k, v)), key0, scale, step=dkdv_step)), {}, "dkdv_step")
    agree(answer, [dk_right, dv_right], _close,
          f"a block of {W} keys at {key0}, {len(rows)} query rows of {S}, D={D}, scale={scale:.3g}")
