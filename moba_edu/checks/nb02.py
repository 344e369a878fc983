"""Checks for notebook 02 (MoBA by masking): block means, scores, eligibility, top-k with the own block.

The exercises work on one head, so their tensors are [S, D] (the library's are [B, H, S, D]). Right
answers come from `moba_edu.routing`; each planted mistake is one slip from docs/design.md §1's list.
"""

from __future__ import annotations

import math

import torch

from ..routing import block_means, block_scores, eligible, indices_to_mask, num_blocks, own_block, select_blocks
from . import Mistake, expect, judge, passed


def _close(a, b) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-6)


def _tensor(answer, shape, dtype, what: str) -> None:
    expect(isinstance(answer, torch.Tensor), f"return a tensor ({what})")
    expect(tuple(answer.shape) == shape, f"{what} should have shape {list(shape)}, got {list(answer.shape)}")
    expect(answer.dtype == dtype, f"{what} should be {dtype}, got {answer.dtype}")


def check_block_means(fn) -> None:
    """fn(k, block_size) -> means: k [S, D] -> [N, D] float32, N = ceil(S / block_size)."""
    gen = torch.Generator().manual_seed(3)
    for S, block_size, dtype in [(10, 4, torch.float32), (8, 4, torch.float32), (3, 4, torch.float32),
                                 (10, 4, torch.float16)]:
        k = torch.randn(S, 3, generator=gen).to(dtype)
        N = num_blocks(S, block_size)
        answer = fn(k, block_size)
        expect(not (isinstance(answer, torch.Tensor) and answer.dim() == 2 and answer.shape[0] == S // block_size < N),
               f"the short last block is missing: S={S}, block_size={block_size} make N = ceil(S / block_size) = {N}")
        _tensor(answer, (N, 3), torch.float32, "the block means (kept in float32, whatever k's dtype)")
        right = block_means(k[None, None], block_size)[0, 0]
        tail = S - (N - 1) * block_size
        padded = right.clone()
        padded[-1] *= tail / block_size
        sums = right * torch.tensor([block_size] * (N - 1) + [tail])[:, None]
        judge(answer, right, {
            f"a padded tail mean: the short last block has {tail} real tokens; average over those, "
            "not over block_size": padded,
            "summed the keys: divide each block's sum by its number of tokens": sums,
            "rounded to the input dtype: accumulate and keep block means in float32": right.to(dtype).float(),
        }, _close, f"wrong block means for S={S}, block_size={block_size}"
           + (" (when block_size divides S the last block is full: S % block_size is 0 there)"
              if S % block_size == 0 else ""))
    passed("block means: float32, the short last block averaged over its real tokens")


def check_block_scores(fn) -> None:
    """fn(q, means) -> scores: q [S, D] (any float dtype), means [N, D] float32 -> [S, N] float32."""
    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.float16):
        q, k = torch.randn(2, 10, 8, generator=gen).to(dtype)
        means = block_means(k[None, None], 4)[0, 0]
        answer = fn(q, means)
        expect(not (isinstance(answer, torch.Tensor) and answer.shape == (3, 10)),
               "transposed: one row per query, one column per block, [S, N]")
        _tensor(answer, (10, 3), torch.float32, "the scores (float32 dot products)")
        right = block_scores(q[None, None], k[None, None], 4)[0, 0]
        judge(answer, right, {
            "a scaled score: MoBA's score is the raw q · mean_k, without attention's 1/sqrt(d)": right / math.sqrt(8),
            "computed in the input dtype: turn q to float32 before the dot product": (q @ means.to(dtype).T).float(),
        }, _close, "wrong scores: scores[t, j] = q_t · means[j]")
    passed("scores: unscaled float32 dot products q · mean_k")


def check_eligible(fn) -> None:
    """fn(S, block_size) -> bool [S, N]: True where block j may be routed to query t."""
    for S, block_size in [(10, 4), (12, 3), (1, 4)]:
        answer = fn(S, block_size)
        N = num_blocks(S, block_size)
        expect(not (isinstance(answer, torch.Tensor) and answer.shape == (N, S) != (S, N)),
               "transposed: one row per query t, one column per block j, [S, N]")
        _tensor(answer, (S, N), torch.bool, "the eligibility mask")
        t, j = torch.arange(S)[:, None], torch.arange(N)[None, :]
        judge(answer, eligible(S, block_size), {
            "the own block was treated as eligible (`<=` where `<` belongs): use j < t // block_size; the "
            "own block's mean includes future keys, so it is attended by force instead": j <= t // block_size,
            "compared the block's first token with t (`j * block_size < t`): the own block slips in; a block "
            "is eligible only if it lies wholly before t's block": j * block_size < t,
            "compared block index j with token index t: compare with the query's block t // block_size": j < t,
        }, torch.equal, f"wrong eligibility for S={S}, block_size={block_size}: eligible iff j < t // block_size")
    passed("eligible iff j < t // block_size: only blocks wholly before the query's own block")


def check_select_blocks(fn) -> None:
    """fn(gates, block_size, top_k) -> bool [S, N]: the own block plus the top_k - 1 eligible blocks with
    the largest gates. gates [S, N] float32 has ineligible blocks at -inf."""
    S, block_size = 20, 4
    N = num_blocks(S, block_size)
    q, k = torch.randn(2, 1, 1, S, 8, generator=torch.Generator().manual_seed(5))
    gates = block_scores(q, k, block_size)[0, 0].masked_fill(~eligible(S, block_size), float("-inf"))
    own = torch.zeros(S, N, dtype=torch.bool)
    own[torch.arange(S), own_block(S, block_size)] = True
    for top_k in (3, 1, N + 2):
        try:
            answer = fn(gates.clone(), block_size, top_k)
        except NotImplementedError:  # a RuntimeError too: the student has not answered yet
            raise
        except RuntimeError as err:
            raise Mistake(f"failed for top_k={top_k} (N={N}): {err}. top_k may exceed the number of "
                          "eligible blocks; then a query attends all of them") from err
        _tensor(answer, (S, N), torch.bool, "the block mask")
        expect(bool(answer[own].all()), "the own block is missing: every query attends its own block "
               "t // block_size, whatever its score")
        expect(not (answer & ~own & (gates == float("-inf"))).any(),
               f"selected a block with gate -inf (not eligible) for top_k={top_k}: when fewer than top_k - 1 "
               "blocks are eligible, the query attends fewer blocks")
        smallest_first = (-gates).nan_to_num(posinf=-math.inf)  # ineligible blocks stay at -inf
        judge(answer, indices_to_mask(select_blocks(gates, block_size, top_k), N), {
            "top_k did not count the own block: add only top_k - 1 routed blocks to it":
                indices_to_mask(select_blocks(gates, block_size, top_k + 1), N),
            "picked the smallest gates: keep the largest q · mean_k":
                indices_to_mask(select_blocks(smallest_first, block_size, top_k), N),
        }, torch.equal, f"wrong blocks for top_k={top_k}")
    passed("top-k: the own block plus the top_k - 1 best eligible blocks")
