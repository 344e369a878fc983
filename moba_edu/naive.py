"""Rung 1: MoBA as a dense [S, S] mask over ordinary softmax attention.

The simplest correct MoBA: route every query (routing.py), expand the block mask to a token mask,
intersect it with the causal mask, and run dense attention. It costs O(S^2) time and memory whatever
`top_k` is, which is why the later rungs exist; it is the readable ground truth they are tested
against. Autograd differentiates it; the routing is computed without gradient (top-k is piecewise
constant), as in the official MoBA reference.

Shapes: q [B, Hq, S, D], k and v [B, Hkv, S, D], Hq = g * Hkv.
"""

from __future__ import annotations

import torch

from .routing import indices_to_mask, num_blocks, route_indices


def token_mask(block_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """bool [..., S, N] block mask -> bool [..., S, S] token mask, causal (key s <= query t)."""
    S = block_mask.shape[-2]
    key_block = torch.arange(S, device=block_mask.device) // block_size
    causal = torch.ones(S, S, dtype=torch.bool, device=block_mask.device).tril()
    return block_mask[..., key_block] & causal


def moba_attention(q, k, v, block_size: int, top_k: int, scale: float):
    """Dense-mask MoBA. Returns o [B, Hq, S, D] (dtype of q) and lse [B, Hq, S] (float32; float64 for
    float64 inputs), the natural log-sum-exp of each query's attention logits q . k * scale over the keys
    it attends."""
    g = q.shape[1] // k.shape[1]
    indices = route_indices(q, k, block_size=block_size, top_k=top_k)  # no gradient: top-k is piecewise constant
    mask = token_mask(indices_to_mask(indices, num_blocks(q.shape[2], block_size)), block_size)  # [B, Hq, S, S]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = k.repeat_interleave(g, dim=1).to(compute)
    v = v.repeat_interleave(g, dim=1).to(compute)
    logits = (q.to(compute) @ k.transpose(-1, -2)) * scale  # attention's scaled q . k (not the router's)
    logits = logits.masked_fill(~mask, float("-inf"))  # every query keeps at least itself
    lse = logits.logsumexp(dim=-1)
    probs = torch.exp(logits - lse[..., None])
    o = probs @ v
    return o.to(q.dtype), lse
