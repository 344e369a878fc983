"""Hidden tests for notebook 03 (routing explorer): the needle query's blocks, the oracle's mass."""

from __future__ import annotations

import torch

from ...viz.quality import oracle_mass
from . import agree, close, generator, randint


def check_needle_blocks(fn) -> None:
    gen = generator("nb03.check_needle_blocks")
    for _ in range(4):
        block_size = randint(gen, 2, 64)
        query = randint(gen, block_size, 8 * block_size)
        key = randint(gen, 0, (query // block_size) * block_size - 1)  # in an earlier block
        for top_k in (1, 2):
            right = {query // block_size} | ({key // block_size} if top_k == 2 else set())
            answer = fn(key, query, block_size, top_k)
            agree({int(j) for j in answer} if answer is not None else None, right, lambda a, b: a == b,
                  f"needle key s={key}, query t={query}, block_size={block_size}, top_k={top_k}")


def check_oracle_mass(fn) -> None:
    gen = generator("nb03.check_oracle_mass")
    for _ in range(3):
        S, block_size = randint(gen, 4, 30), randint(gen, 1, 7)
        N = -(-S // block_size)
        top_k = randint(gen, 1, N + 1)
        weights = torch.rand(S, S, generator=gen).tril()
        probs = weights / weights.sum(-1, keepdim=True)
        mass = torch.stack([probs[:, j * block_size:(j + 1) * block_size].sum(-1) for j in range(N)], -1)
        agree(fn(mass.clone(), block_size, top_k), oracle_mass(mass, block_size, top_k),
              lambda a, b: close(a, b, 1e-6, 1e-6), f"S={S}, block_size={block_size}, top_k={top_k}")
