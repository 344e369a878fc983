"""Routing variants beyond MoBA's mean router (notebook 10), one idea per function.

Every variant returns block indices in `Routing.indices` form, int64 [B, Hq, S, K]: the own block
t // block_size first, then routed blocks wholly before it by descending score, then -1. So any
variant can be handed to `efficient.attention_given_routing`, which attends exactly the chosen blocks,
and compared with MoBA at equal cost (`cost.routed_pair_counts`). Every variant is causal: a routed
block lies wholly before the query's own block, and its representative uses no key after that block.

- `moba`:        the parameter-free mean router (routing.py), the baseline.
- `key_conv`:    a short causal depthwise convolution over the keys before the mean (FlashMoBA, Xiao et
                 al., 2025, "Optimizing Mixture of Block Attention").
- `max_pooled`:  each block represented by the elementwise max of its keys instead of the mean.
- `tile_shared`: one choice per tile of consecutive queries, by the tile's mean query (what block-sparse
                 kernels and FlexAttention's block masks need: one key block list per query tile).
- `indexer_indices` with `LightningIndexer`: token-level top-k by a small learned scorer trained
                 against full attention with a KL loss (DeepSeek-V3.2's sparse attention, DSA).
                 Token level is block_size = 1 in the same form. `model.py`'s "dsa" layers train
                 one per layer with the model.

Shapes: q [B, Hq, S, D], k [B, Hkv, S, D], g = Hq // Hkv; N = ceil(S / block_size).
"""

from __future__ import annotations

import math

import torch

from .inputs import check_int, check_tensors
from .routing import block_means, eligible, num_blocks, route_indices, select_blocks


def moba(q: torch.Tensor, k: torch.Tensor, *, block_size: int, top_k: int) -> torch.Tensor:
    """MoBA's own router, `routing.route_indices`: q . mean(k_block), top_k - 1 best past blocks."""
    return route_indices(q, k, block_size=block_size, top_k=top_k)


def select(scores: torch.Tensor, block_size: int, top_k: int) -> torch.Tensor:
    """MoBA's selection rule on any scores float32 [B, Hq, S, N]: eligible blocks only (j < t //
    block_size), own block first, then the top_k - 1 best -> int64 [B, Hq, S, min(top_k, N)]."""
    S, N = scores.shape[-2:]
    gates = scores.masked_fill(~eligible(S, block_size, scores.device, n_blocks=N), float("-inf"))
    return select_blocks(gates, block_size, top_k)


def scores_against(q: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:
    """q . rep for every block representative: q [B, Hq, S, D], reps [B, Hkv, N, D] -> float32 [B, Hq, S, N]."""
    g = q.shape[1] // reps.shape[1]
    return q.detach().float() @ reps.float().repeat_interleave(g, dim=1).transpose(-1, -2)


def _check(q, k, block_size, top_k, caller):
    check_tensors(q, k, None, rank=4, layout="[B,H,S,D]", caller=caller)
    return check_int(block_size, "block_size"), check_int(top_k, "top_k")


def causal_key_conv(k: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Short causal depthwise convolution along the sequence (differentiable in k and weight).

    k: [B, H, S, D]; weight: [W] (every channel), [H, W] (per head) or [H, D, W] (per channel), tap
    W - 1 on the current key: out_s = sum_i weight[i] * k_{s - (W - 1) + i}, keys before position 0
    taken as zero. Output [B, H, S, D] in float32 (float64 for float64 k); key s of the output reads
    keys <= s only.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (1, 2, 3):
        raise ValueError(f"weight must be a tensor [W], [H, W] or [H, D, W], got {getattr(weight, 'shape', weight)!r}")
    if weight.dim() >= 2 and weight.shape[0] != k.shape[1] or weight.dim() == 3 and weight.shape[1] != k.shape[3]:
        raise ValueError(f"weight [H, W] or [H, D, W] must match k's H = {k.shape[1]} heads and D = {k.shape[3]}, "
                         f"got {tuple(weight.shape)}")
    compute = torch.float64 if k.dtype == torch.float64 else torch.float32
    W, S = weight.shape[-1], k.shape[2]
    w = weight.to(k.device, compute).reshape(-1, weight.shape[1] if weight.dim() == 3 else 1, W)  # [H|1, D|1, W]
    w = w.permute(0, 2, 1)[None, :, :, None, :]                                                   # [1, H|1, W, 1, D|1]
    padded = torch.nn.functional.pad(k.to(compute), (0, 0, W - 1, 0))  # W - 1 zero keys in front
    shifted = torch.stack([padded[:, :, i:i + S] for i in range(W)], dim=2)  # [B, H, W, S, D]
    return (w * shifted).sum(dim=2)


def key_conv(q: torch.Tensor, k: torch.Tensor, *, block_size: int, top_k: int, weight: torch.Tensor) -> torch.Tensor:
    """MoBA's mean router on causally convolved keys (`causal_key_conv`; weight [W] or [Hkv, W]).

    Attention still reads the original keys; only the block representatives change. A block's
    convolved mean reads at most W - 1 keys of the block before it, never a later key: causal.
    """
    block_size, top_k = _check(q, k, block_size, top_k, "key_conv")
    return route_indices(q.float(), causal_key_conv(k, weight), block_size=block_size, top_k=top_k)


def block_max(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Elementwise max of each block's keys: k [B, H, S, D] -> float32 [B, H, N, D] (a short last
    block over its real keys)."""
    B, H, S, D = k.shape
    N = num_blocks(S, block_size)
    padded = torch.nn.functional.pad(k.detach().float(), (0, 0, 0, N * block_size - S), value=float("-inf"))
    return padded.view(B, H, N, block_size, D).amax(dim=3)


def max_pooled(q: torch.Tensor, k: torch.Tensor, *, block_size: int, top_k: int) -> torch.Tensor:
    """Route by q . max(k_block), the elementwise max of the block's keys, instead of the mean."""
    block_size, top_k = _check(q, k, block_size, top_k, "max_pooled")
    return select(scores_against(q, block_max(k, block_size)), block_size, top_k)


def tile_shared(q: torch.Tensor, k: torch.Tensor, *, block_size: int, top_k: int, tile_size: int,
                by: str = "mean") -> torch.Tensor:
    """One routed set per tile of `tile_size` consecutive queries (tiles start at 0, the last may be short).

    by="mean": the tile routes by its mean query (the mean of the tile's scores: the score is linear in
    q); by="first": by its first query. Either way only blocks eligible for the tile's FIRST query
    compete, so no query routes to its own or a later block; each query keeps its own block first.
    Caution: with "mean", query t's choice depends on the later queries of its tile (fine when every
    query is known, as in prefill; a leak of the future when training a causal model). "first" reads
    only the tile's first query. tile_size = 1 is MoBA.
    """
    block_size, top_k = _check(q, k, block_size, top_k, "tile_shared")
    tile_size = check_int(tile_size, "tile_size")
    if by not in ("mean", "first"):
        raise ValueError(f"by must be 'mean' or 'first', got {by!r}")
    B, Hq, S, D = q.shape
    if S == 0:
        return route_indices(q, k, block_size=block_size, top_k=top_k)
    n_tiles = num_blocks(S, tile_size)
    tile = torch.arange(S, device=q.device) // tile_size  # [S]
    if by == "mean":
        q_tile = torch.zeros(B, Hq, n_tiles, D, device=q.device).index_add_(2, tile, q.detach().float())
        q_tile /= torch.bincount(tile, minlength=n_tiles).float()[:, None]
    else:
        q_tile = q.detach().float()[:, :, ::tile_size]
    scores = scores_against(q_tile, block_means(k, block_size))[:, :, tile]  # [B, Hq, S, N]: the tile's scores
    first = tile * tile_size  # each query's tile start
    ineligible = torch.arange(scores.shape[-1], device=q.device)[None, :] >= (first // block_size)[:, None]
    return select(scores.masked_fill(ineligible, float("-inf")), block_size, top_k)


class LightningIndexer(torch.nn.Module):
    """DSA's lightning indexer at course size (DeepSeek-AI, 2025, DeepSeek-V3.2-Exp).

    Score of query t for key s: I[t, s] = sum_j w[t, j] * relu(qI[t, j] . kI[s]) over `heads` indexer
    heads of `dim` dimensions, with qI = q Wq, w = q Ww (per query) and kI = k Wk (one key per token,
    shared by the indexer heads). In DSA the indexer reads the hidden state; here it reads the head's
    own q and k [.., D], so one indexer serves every head. Few, small heads keep it cheap.
    """

    def __init__(self, head_dim: int, *, heads: int = 4, dim: int = 8, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        init = lambda *shape: torch.nn.Parameter(torch.randn(*shape, generator=gen) / math.sqrt(shape[0]))  # noqa: E731
        self.wq, self.wk, self.ww = init(head_dim, heads * dim), init(head_dim, dim), init(head_dim, heads)
        self.heads, self.dim = heads, dim

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q [B, Hq, S, D], k [B, Hkv, S, D] -> index scores float32 [B, Hq, S, S] (not causally masked)."""
        ki = (k.float() @ self.wk).repeat_interleave(q.shape[1] // k.shape[1], dim=1).transpose(-1, -2)  # [B, H, d, S]
        qi, w = (q.float() @ self.wq).split(self.dim, dim=-1), q.float() @ self.ww   # h x [B, H, S, d]; [B, H, S, h]
        scores = 0.0
        for j, qj in enumerate(qi):  # one indexer head at a time: [B, H, S, S] live, not [B, H, S, h, S]
            scores = scores + w[..., j, None] * torch.relu(qj @ ki)
        return scores


def indexer_loss(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(target || softmax of the causal index scores), DSA's warm-up loss.

    scores float32 [..., S, S]; target [..., S, S]: full causal attention (rows sum to 1, 0 after t).
    """
    S = scores.shape[-1]
    causal = torch.ones(S, S, dtype=torch.bool, device=scores.device).tril()
    log_p = scores.masked_fill(~causal, float("-inf")).log_softmax(dim=-1).masked_fill(~causal, 0.0)
    entropy = -(target * target.clamp_min(1e-30).log()).sum(-1)
    return (-(target * log_p).sum(-1) - entropy).mean()


def train_indexer(indexer: LightningIndexer, samples, *, steps: int = 200, lr: float = 1e-2) -> list[float]:
    """Fit the indexer to full attention: `samples` is a list of (q, k, probs) with q [B, Hq, S, D],
    k [B, Hkv, S, D] and probs their full causal attention [B, Hq, S, S] (`viz.attention_probs`),
    cycled through for `steps` Adam steps. Returns the KL loss of every step."""
    opt = torch.optim.Adam(indexer.parameters(), lr=lr)
    losses = []
    for step in range(check_int(steps, "steps")):
        q, k, probs = samples[step % len(samples)]
        loss = indexer_loss(indexer(q, k), probs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def indexer_indices(indexer: LightningIndexer, q: torch.Tensor, k: torch.Tensor, *, top_k: int) -> torch.Tensor:
    """Token-level routing (block_size = 1): each query keeps itself plus the top_k - 1 earlier tokens
    with the largest index scores -> int64 [B, Hq, S, min(top_k, S)]."""
    _check(q, k, 1, top_k, "indexer_indices")
    with torch.no_grad():
        return select(indexer(q, k), 1, top_k)
