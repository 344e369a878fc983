"""Hidden tests for notebook 02 (MoBA by masking): block means, scores, eligibility, top-k."""

from __future__ import annotations

import torch

from ...routing import block_means, block_scores, eligible, indices_to_mask, num_blocks, select_blocks
from . import agree, close, equal, generator, randint


def check_block_means(fn) -> None:
    gen = generator("nb02.check_block_means")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        S, block_size, D = randint(gen, 1, 30), randint(gen, 1, 9), randint(gen, 1, 5)
        k = torch.randn(S, D, generator=gen).to(dtype)
        agree(fn(k, block_size), block_means(k[None, None], block_size)[0, 0], close,
              f"k [{S}, {D}] {dtype}, block_size={block_size}")


def check_block_scores(fn) -> None:
    gen = generator("nb02.check_block_scores")
    for dtype in (torch.float32, torch.bfloat16):
        S, block_size, D = randint(gen, 1, 24), randint(gen, 1, 6), randint(gen, 1, 6)
        q, k = (torch.randn(1, 1, S, D, generator=gen).to(dtype) for _ in range(2))
        means = block_means(k, block_size)[0, 0]
        agree(fn(q[0, 0], means), block_scores(q, k, block_size)[0, 0], lambda a, b: close(a, b, 1e-4, 1e-4),
              f"q [{S}, {D}] {dtype}, {len(means)} block means")


def check_eligible(fn) -> None:
    gen = generator("nb02.check_eligible")
    for S, block_size in [(1, 1), (5, 5), (6, 5)] + [(randint(gen, 1, 40), randint(gen, 1, 10)) for _ in range(3)]:
        agree(fn(S, block_size), eligible(S, block_size), lambda a, b: equal(a, b) and a.dtype == torch.bool,
              f"S={S}, block_size={block_size}")


def check_select_blocks(fn) -> None:
    gen = generator("nb02.check_select_blocks")
    for _ in range(3):
        S, block_size = randint(gen, 8, 40), randint(gen, 2, 8)
        N = num_blocks(S, block_size)
        top_k = randint(gen, 1, N + 1)
        q, k = torch.randn(2, 1, 1, S, 4, generator=gen)
        gates = block_scores(q, k, block_size)[0, 0].masked_fill(~eligible(S, block_size), float("-inf"))
        agree(fn(gates.clone(), block_size, top_k), indices_to_mask(select_blocks(gates, block_size, top_k), N),
              lambda a, b: equal(a, b) and a.dtype == torch.bool, f"S={S}, block_size={block_size}, top_k={top_k}")
