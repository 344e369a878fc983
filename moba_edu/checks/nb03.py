"""Checks for notebook 03 (routing explorer): predict the needle query's blocks; the oracle's mass.

Right answers come from the library: `moba_edu.route` on planted needles, `viz.quality.oracle_mass`
for the oracle. Each planted mistake is one slip a reader of docs/design.md §1 tends to make.
"""

from __future__ import annotations

import torch

from ..routing import route
from ..viz.presets import make_sample
from ..viz.quality import oracle_mass
from . import Mistake, expect, judge, passed


def _as_set(answer, what: str) -> set:
    expect(answer is not None, f"return the set of {what}, e.g. {{3, 0}} (got None: is there a return?)")
    try:
        return {int(j) for j in answer}
    except TypeError:
        raise Mistake(f"return a set of block indices ({what}), got {answer!r}") from None


def check_needle_blocks(fn) -> None:
    """fn(needle_key, needle_query, block_size, top_k) -> set of the blocks the needle query attends,
    for top_k 1 or 2 and a needle in an earlier block than the query's."""
    for seq_len, block_size in [(256, 32), (128, 16), (64, 8), (512, 64), (256, 24)]:
        sample = make_sample("needle", seq_len=seq_len, heads=1)
        key, query = sample.needle_key, sample.needle_query
        for top_k in (2, 1):
            chosen = route(sample.q, sample.k, block_size=block_size, top_k=top_k).indices[0, 0, query]
            right = {int(j) for j in chosen if j >= 0}
            own, needle = query // block_size, key // block_size
            answer = _as_set(fn(key, query, block_size, top_k), "blocks the needle query attends")
            case = f"(needle key s={key}, needle query t={query}, block_size={block_size}, top_k={top_k})"
            judge(answer, right, {
                f"the own block is missing {case}: query t always attends its own block t // block_size, "
                "and top_k counts it": right - {own},
                f"top_k counts the own block {case}: top_k = 1 is the own block alone, top_k = 2 adds one "
                "routed block": right | {needle},
                f"off by one block {case}: block j holds positions j*block_size .. (j+1)*block_size - 1, so "
                "position s lies in block s // block_size": {own, needle + 1} if top_k == 2 else {own + 1},
                f"off by one block {case}: positions start at 0, so the block of s is s // block_size, "
                "not (s + 1) // block_size": {(s + 1) // block_size for s in (query, key)[:top_k]},
                f"ceil(s / block_size) is not the block of s {case}: the block of position s is "
                "s // block_size": {-(-s // block_size) for s in (query, key)[:top_k]},
            }, lambda a, b: a == b, f"these are not the blocks the needle query attends {case}")
    passed("needle: the query attends its own block, and with top_k = 2 the needle's block s // block_size")


def check_oracle_mass(fn) -> None:
    """fn(mass, block_size, top_k) -> kept: mass [S, N] (attention mass per key block) -> [S]."""
    gen = torch.Generator().manual_seed(5)
    for S, block_size, top_k in [(24, 4, 3), (24, 4, 1), (20, 3, 9), (16, 4, 2)]:
        N = -(-S // block_size)
        weights = torch.rand(S, S, generator=gen).tril()  # causal: no mass after the query
        probs = weights / weights.sum(-1, keepdim=True)
        mass = torch.stack([probs[:, j * block_size:(j + 1) * block_size].sum(-1) for j in range(N)], dim=-1)
        answer = fn(mass, block_size, top_k)
        expect(isinstance(answer, torch.Tensor) and tuple(answer.shape) == (S,),
               f"return a tensor [S] = [{S}], one kept mass per query, got "
               f"{tuple(answer.shape) if isinstance(answer, torch.Tensor) else type(answer).__name__}")
        right = oracle_mass(mass, block_size, top_k)
        own = mass[torch.arange(S), torch.arange(S) // block_size]
        past = mass.masked_fill(torch.arange(N)[None, :] > (torch.arange(S) // block_size)[:, None], 0.0)
        best_any = past.topk(min(top_k, N), dim=-1).values.sum(-1)
        judge(answer, right, {
            "the own block was not forced: MoBA always attends it, so the oracle keeps it and picks only "
            "the other top_k - 1 blocks by mass": best_any,
            "top_k counts the own block: keep the own block plus top_k - 1 others, not top_k others":
                oracle_mass(mass, block_size, top_k + 1),
            "the own block was treated as eligible (counted twice): pick the others among blocks "
            "j < t // block_size": own + past.topk(min(top_k - 1, N), dim=-1).values.sum(-1) if top_k > 1 else own,
        }, lambda a, b: torch.allclose(a.double(), b.double(), atol=1e-6),
            f"wrong kept mass for S={S}, block_size={block_size}, top_k={top_k}: own block's mass plus "
            "the top_k - 1 largest masses of the eligible blocks")
    passed("oracle: the own block plus the top_k - 1 richest eligible blocks")
