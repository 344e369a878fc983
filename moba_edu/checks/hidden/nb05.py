"""Hidden tests for notebook 05 (Triton primer): the online-softmax step, the tile-max kernel."""

from __future__ import annotations

import torch

from .. import Mistake
from ..nb05 import tile_max_case
from . import agree, close, generator, randint


def check_attention_update(fn) -> None:
    gen = generator("nb05.check_attention_update")
    M, D, tile = randint(gen, 1, 6), randint(gen, 1, 5), randint(gen, 1, 7)
    S = tile * randint(gen, 2, 4) + randint(gen, 0, tile - 1)
    s = torch.randn(M, S, generator=gen) * 30
    s[:, tile:] = s[:, tile:].masked_fill(torch.rand(M, S - tile, generator=gen) < 0.3, float("-inf"))
    v = torch.randn(S, D, generator=gen)
    m, l, acc = torch.full((M,), float("-inf")), torch.zeros(M), torch.zeros(M, D)
    for start in range(0, S, tile):
        m, l, acc = fn(m, l, acc, s[:, start:start + tile], v[start:start + tile])
    agree((m, acc / l[:, None], m + torch.log(l)), (s.amax(-1), s.softmax(-1) @ v, s.logsumexp(-1)),
          lambda a, b: close(a, b, 1e-4, 1e-4), f"{M} queries, {S} keys in tiles of {tile}, D={D}")


def check_tile_max(kernel) -> None:
    gen = generator("nb05.check_tile_max")
    for _ in range(2):   # on guarded buffers and the notebook's device, as the visible check runs it
        n, block = randint(gen, 1, 100), 2 ** randint(gen, 3, 6)
        try:
            tile_max_case(kernel, n, block, gen)
        except Mistake:
            raise Mistake(f"hidden test: wrong answer for n={n}, BLOCK={block} (the visible cases passed: "
                          "look at the edge cases)") from None
