"""The MoBA router: block means, scores, gates, eligibility and top-k (docs/design.md §1).

Every rung (naive, torch, triton) routes exactly as this file says; the Triton router kernel is tested
against it. The router has no parameters: a query scores each key block by the dot product of the query
with the block's mean key, and keeps its own block plus the `top_k - 1` best blocks wholly in its past.

Vocabulary: `scores` are the raw q_t . mean_k(j) of every block; `gates` are the scores with the
ineligible blocks (j >= t // block_size) set to -inf, what top-k ranks.

Two entry points: `route` returns every decision for inspection ([S, N] tensors: small S);
`route_indices` returns only the chosen blocks, holding a bounded number of gates at a time (what the
rungs call).

Shapes: q [B, Hq, S, D], k [B, Hkv, S, D], N = ceil(S / block_size) blocks, g = Hq // Hkv.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks.grading import exercise
from .inputs import check_int, check_tensors

# Gate entries (float32) `route_indices` may hold at once: 2**22 of them are 16 MiB. Past that, queries
# are routed a chunk of rows at a time.
GATE_BUDGET = 2**22


@dataclass
class Routing:
    """What the router decided, for inspection (small S: it holds [S, N] tensors).

    indices: int64 [B, Hq, S, min(top_k, N)]: own block first, then routed blocks by descending gate,
             then -1 where fewer blocks were eligible.
    mask:    bool [B, Hq, S, N], True where query t attends block j.
    scores:  float32 [B, Hq, S, N], the raw score q_t . mean_k(j) of every block.
    gates:   float32 [B, Hq, S, N], scores with ineligible blocks (j >= t // block_size) set to -inf.
    """

    indices: torch.Tensor
    mask: torch.Tensor
    scores: torch.Tensor
    gates: torch.Tensor


@exercise("nb00.check_num_blocks")
def num_blocks(seq_len: int, block_size: int) -> int:
    """N = ceil(seq_len / block_size): the last block may be shorter."""
    return -(-seq_len // block_size)


@exercise("nb02.check_block_means")
def block_means(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean key of every block, accumulated and kept in float32.

    k: [B, Hkv, S, D] -> [B, Hkv, N, D] float32. A short last block is averaged over its real tokens
    only (its mean never matters for routing: the last block is never eligible, docs/design.md §1).
    """
    B, H, S, D = k.shape
    N = num_blocks(S, block_size)
    pad = N * block_size - S
    k32 = torch.nn.functional.pad(k.detach().float(), (0, 0, 0, pad))  # zeros add nothing to the sum
    sums = k32.view(B, H, N, block_size, D).sum(dim=3)
    counts = torch.full((N,), float(block_size), device=k.device)
    if N:
        counts[-1] = S - (N - 1) * block_size
    return sums / counts[:, None]


def block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """scores[b, h, t, j] = q_t . mean_k(j) in float32, not scaled.

    q: [B, Hq, S, D], k: [B, Hkv, S, D] -> [B, Hq, S, N] float32. Query head h reads key head h // g.
    """
    B, Hq, S, D = q.shape
    g = Hq // k.shape[1]
    means = block_means(k, block_size).repeat_interleave(g, dim=1)  # [B, Hq, N, D], small
    return q.detach().float() @ means.transpose(-1, -2)


@exercise("nb02.check_eligible")
def eligible(seq_len: int, block_size: int, device=None, start: int = 0, n_blocks: int | None = None) -> torch.Tensor:
    """bool [S, N]: block j may be routed to query t only if it lies wholly before t's own block.

    j < t // block_size. The own block itself is not eligible: its mean would include future keys.
    Rows are the queries start .. start + seq_len - 1 (a chunk of a longer sequence of n_blocks blocks).
    """
    t = torch.arange(start, start + seq_len, device=device)
    j = torch.arange(num_blocks(start + seq_len, block_size) if n_blocks is None else n_blocks, device=device)
    return j[None, :] < (t // block_size)[:, None]


def own_block(seq_len: int, block_size: int, device=None, start: int = 0) -> torch.Tensor:
    """int64 [S]: the block that holds each query, t // block_size; always attended (causally).

    Rows are the queries start .. start + seq_len - 1.
    """
    return torch.arange(start, start + seq_len, device=device) // block_size


@exercise("nb02.check_select_blocks", "nb09.check_route_token")
def select_blocks(gates: torch.Tensor, block_size: int, top_k: int, start: int = 0) -> torch.Tensor:
    """Own block first, then the top_k - 1 eligible blocks with the largest gates, then -1.

    gates: float32 [..., S, N] with ineligible blocks at -inf -> int64 [..., S, min(top_k, N)]. Rows are
    the queries start .. start + S - 1.
    """
    *lead, S, N = gates.shape
    own = own_block(S, block_size, gates.device, start).expand(*lead, S).unsqueeze(-1)
    n_routed = min(top_k - 1, max(N - 1, 0))  # the own block is never among the eligible ones
    if n_routed == 0:
        return own.clone()
    best, routed = gates.topk(n_routed, dim=-1)  # sorted by descending gate
    routed = routed.masked_fill(best == float("-inf"), -1)  # fewer eligible blocks than asked for
    return torch.cat([own, routed], dim=-1)


def indices_to_mask(indices: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """int64 [..., S, K] block indices (-1 = none) -> bool [..., S, N] block mask."""
    mask = torch.zeros(*indices.shape[:-1], n_blocks + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, torch.where(indices < 0, n_blocks, indices), True)  # -1 lands in a spare column
    return mask[..., :n_blocks]


def _check(q, k, block_size, top_k, caller: str) -> tuple[int, int]:
    check_tensors(q, k, None, rank=4, layout="[B,H,S,D]", caller=caller)
    return check_int(block_size, "block_size"), check_int(top_k, "top_k")


def route(q: torch.Tensor, k: torch.Tensor, *, block_size: int, top_k: int) -> Routing:
    """Route every query of q [B, Hq, S, D] to key blocks of k [B, Hkv, S, D]; see `Routing`.

    For inspection: it holds [B, Hq, S, N] tensors (`route_indices` does not). A NaN or inf in one key
    makes its block's mean, and so every query's score for that block, NaN; top-k ranks NaN above
    every number, so each query for which that block is eligible picks it (and reads the bad key).
    """
    block_size, top_k = _check(q, k, block_size, top_k, "route")
    S = q.shape[2]
    with torch.no_grad():
        scores = block_scores(q, k, block_size)
        gates = scores.masked_fill(~eligible(S, block_size, q.device), float("-inf"))
        indices = select_blocks(gates, block_size, top_k)
        mask = indices_to_mask(indices, num_blocks(S, block_size))
    return Routing(indices=indices, mask=mask, scores=scores, gates=gates)


def route_indices(q: torch.Tensor, k: torch.Tensor, *, block_size: int, top_k: int,
                  gate_budget: int = GATE_BUDGET) -> torch.Tensor:
    """`route(q, k, ...).indices`, holding at most about `gate_budget` gates at a time.

    q: [B, Hq, S, D], k: [B, Hkv, S, D] -> int64 [B, Hq, S, min(top_k, N)] (own block first, then the
    routed blocks by descending gate, then -1). Block means are computed once; the scores of a chunk of
    query rows are `block_scores`'s dot products against them, masked by `eligible` for those rows.
    """
    block_size, top_k = _check(q, k, block_size, top_k, "route_indices")
    B, Hq, S, _ = q.shape
    g = Hq // k.shape[1]
    N = num_blocks(S, block_size)
    if S == 0:
        return torch.empty(B, Hq, 0, 0, dtype=torch.int64, device=q.device)
    with torch.no_grad():
        means_t = block_means(k, block_size).repeat_interleave(g, dim=1).transpose(-1, -2)  # [B, Hq, D, N]
        rows = max(1, gate_budget // max(1, B * Hq * N))
        chunks = []
        for start in range(0, S, rows):
            q_rows = q[:, :, start:start + rows]
            scores = q_rows.detach().float() @ means_t  # [B, Hq, rows, N]
            ineligible = ~eligible(q_rows.shape[2], block_size, q.device, start=start, n_blocks=N)
            gates = scores.masked_fill(ineligible, float("-inf"))
            chunks.append(select_blocks(gates, block_size, top_k, start=start))
    return torch.cat(chunks, dim=2)
