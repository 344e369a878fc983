"""Hidden tests for notebook 00 (welcome): block counts and MoBA's share of the causal scores."""

from __future__ import annotations

from ...routing import num_blocks
from ...cost import attended_pairs, dense_pairs
from . import agree, generator, randint


def check_num_blocks(fn) -> None:
    gen = generator("nb00.check_num_blocks")
    cases = [(1, 1), (9, 9), (10, 9), (9, 10)] + [(randint(gen, 1, 10**6), randint(gen, 1, 5000)) for _ in range(4)]
    for S, block_size in cases:
        answer = fn(S, block_size)
        agree(answer, num_blocks(S, block_size), lambda a, b: isinstance(a, int) and a == b,
              f"S={S}, block_size={block_size}")


def check_causal_fraction(fn) -> None:
    gen = generator("nb00.check_causal_fraction")
    cases = [(1, 1, 1), (12, 12, 2), (30, 7, 1)] + [
        (randint(gen, 1, 120), randint(gen, 1, 20), randint(gen, 1, 8)) for _ in range(3)]
    for S, block_size, top_k in cases:
        right = attended_pairs(S, block_size, top_k) / dense_pairs(S)
        agree(fn(S, block_size, top_k), right, lambda a, b: abs(a - b) <= 1e-6 * b,
              f"S={S}, block_size={block_size}, top_k={top_k}")
