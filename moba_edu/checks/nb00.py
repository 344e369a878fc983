"""Checks for notebook 00 (welcome): counting blocks and the share of the causal score matrix MoBA computes.

The right answers come from the library (`routing.num_blocks`, and a routed token mask counted entry by
entry); the planted mistakes are counted with a per-query formula, one variant per likely slip.
"""

from __future__ import annotations

import math
from numbers import Integral

import torch

from ..naive import token_mask
from ..routing import num_blocks, route
from . import expect, judge, passed


def check_num_blocks(fn) -> None:
    """fn(S, block_size) -> N, the number of key blocks (an int)."""
    for S, block_size in [(4096, 512), (4100, 512), (1, 64), (100, 300)]:
        answer = fn(S, block_size)
        expect(isinstance(answer, Integral), f"return an int (got {type(answer).__name__}): "
               "a number of blocks is whole; `math.ceil` or `-(-S // block_size)` give one")
        judge(answer, num_blocks(S, block_size), {
            "rounded down: a short last block still counts, so N = ceil(S / block_size)": S // block_size,
            "one block too many when block_size divides S: use ceil(S / block_size), not S // block_size + 1":
                S // block_size + 1,
        }, lambda a, b: a == b, f"wrong number of blocks for S={S}, block_size={block_size}")
    passed("N = ceil(S / block_size): the last block may be shorter")


def _routed_fraction(S: int, block_size: int, top_k: int) -> float:
    """Share of the causal (query, key) pairs that MoBA's routing keeps, counted on a real routing."""
    qk = torch.randn(2, 1, 1, S, 4, generator=torch.Generator().manual_seed(0))
    kept = token_mask(route(qk[0], qk[1], block_size=block_size, top_k=top_k).mask, block_size).sum().item()
    return kept / (S * (S + 1) / 2)


def _pairs(S: int, block_size: int, routed, own_causal: bool = True) -> int:
    """(query, key) pairs when query t keeps its own block (causally or whole) and `routed(b)` full
    blocks of its past, b = t // block_size."""
    total = 0
    for t in range(S):
        b = t // block_size
        own = t - b * block_size + 1 if own_causal else min(block_size, S - b * block_size)
        total += own + routed(b) * block_size
    return total


def check_causal_fraction(fn) -> None:
    """fn(S, block_size, top_k) -> the fraction (0..1] of the causal score matrix MoBA computes."""
    for S, block_size, top_k in [(200, 16, 3), (64, 8, 1), (50, 16, 8)]:
        answer = fn(S, block_size, top_k)
        causal = S * (S + 1) / 2
        kept = _pairs(S, block_size, lambda b: min(top_k - 1, b))
        judge(answer, _routed_fraction(S, block_size, top_k), {
            "returned a count: divide by the S (S + 1) / 2 entries of the causal score matrix": kept,
            "divided by S²: the causal score matrix has only S (S + 1) / 2 entries (keys s <= t)": kept / S**2,
            "top_k counts the own block: a query attends its own block and top_k - 1 others":
                _pairs(S, block_size, lambda b: min(top_k, b)) / causal,
            "a query in block b has only b blocks in its past: it routes to min(top_k - 1, b) of them":
                _pairs(S, block_size, lambda b: top_k - 1) / causal,
            "the own block is attended causally: query t sees only the keys <= t of its own block":
                _pairs(S, block_size, lambda b: min(top_k - 1, b), own_causal=False) / causal,
        }, lambda a, b: math.isclose(a, b, rel_tol=1e-6),
            f"wrong fraction for S={S}, block_size={block_size}, top_k={top_k}")
    passed("MoBA computes that share of the causal score matrix; top_k >= N computes all of it")
