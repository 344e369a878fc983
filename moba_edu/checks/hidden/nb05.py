"""Hidden tests for notebook 05 (Triton primer): the online-softmax step, the tile-max kernel."""

from __future__ import annotations

import torch

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
    for _ in range(2):
        n, block = randint(gen, 1, 100), 2 ** randint(gen, 3, 6)
        tiles = -(-n // block)
        memory = torch.full((tiles * block + 64,), 1000.0)  # x, then memory that is not x
        memory[:n] = -1 - torch.rand(n, generator=gen)
        out = torch.full((tiles + 4,), float("nan"))
        kernel[(tiles,)](memory[:n], out, n, BLOCK=block)
        right = torch.stack([memory[i * block:min((i + 1) * block, n)].max() for i in range(tiles)])
        agree(out, torch.cat([right, torch.full((4,), float("nan"))]), lambda a, b: close(a, b, 0, 0),
              f"n={n}, BLOCK={block}")
