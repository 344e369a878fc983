"""The MoBA router: block means, gates, eligibility and top-k (DESIGN.md §1).

Every rung (naive, torch, triton) routes exactly as this file says; the Triton router kernel is tested
against it. The router has no parameters: a query scores each key block by the dot product of the query
with the block's mean key, and keeps its own block plus the `top_k - 1` best blocks wholly in its past.

Shapes: q [B, Hq, S, D], k [B, Hkv, S, D], N = ceil(S / block_size) blocks, g = Hq // Hkv.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks.grading import exercise


@dataclass
class Routing:
    """What the router decided, for inspection (small S: it holds [S, N] tensors).

    indices: int64 [B, Hq, S, min(top_k, N)]: own block first, then routed blocks by descending gate,
             then -1 where fewer blocks were eligible.
    mask:    bool [B, Hq, S, N], True where query t attends block j.
    scores:  float32 [B, Hq, S, N], the raw gate q_t . mean_k(j) of every block.
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
    only (its mean never matters for routing: the last block is never eligible, DESIGN.md §1).
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


def gate_scores(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
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


@exercise("nb02.check_select_blocks")
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


def route(q: torch.Tensor, k: torch.Tensor, *, block_size: int, top_k: int) -> Routing:
    """Route every query of q [B, Hq, S, D] to key blocks of k [B, Hkv, S, D]; see `Routing`."""
    from .inputs import check_int, check_tensors

    check_tensors(q, k, k, rank=4, layout="[B,H,S,D]")
    block_size = check_int(block_size, "block_size")
    top_k = check_int(top_k, "top_k")
    with torch.no_grad():
        return _route(q, k, block_size, top_k)


def _route(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int) -> Routing:
    S = q.shape[2]
    scores = gate_scores(q, k, block_size)
    gates = scores.masked_fill(~eligible(S, block_size, q.device), float("-inf"))
    indices = select_blocks(gates, block_size, top_k)
    mask = indices_to_mask(indices, num_blocks(S, block_size))
    return Routing(indices=indices, mask=mask, scores=scores, gates=gates)
