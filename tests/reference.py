"""An independent float64 reference for MoBA (DESIGN.md §1), written from the spec, not from the package.

It shares no code with moba_edu: block means by a loop over blocks, the top-k by a full sort, the
mask built query by query block, attention in float64. Routing is done in float32 as the spec says,
so that it agrees with every rung on continuous random data.
"""

import math

import torch


def reference_routing_mask(q, k, block_size, top_k):
    """bool [S, N] of one head: q [S, D], k [S, D] (any float dtype)."""
    S = q.shape[0]
    n_blocks = math.ceil(S / block_size)
    means = torch.stack([k[j * block_size:(j + 1) * block_size].float().mean(0) for j in range(n_blocks)]) \
        if n_blocks else k.new_zeros(0, k.shape[1], dtype=torch.float32)
    gates = q.float() @ means.T  # [S, N], float32, unscaled
    mask = torch.zeros(S, n_blocks, dtype=torch.bool, device=q.device)
    for t in range(S):
        own = t // block_size
        mask[t, own] = True
        if own == 0 or top_k == 1:
            continue
        order = torch.sort(gates[t, :own], descending=True, stable=True).indices
        mask[t, order[: top_k - 1]] = True
    return mask


def reference_head(q, k, v, block_size, top_k, scale=None):
    """One head, one sequence: q, k, v [S, D] -> o float64 [S, D], lse float64 [S]."""
    S, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    block_mask = reference_routing_mask(q, k, block_size, top_k)
    token_mask = block_mask.repeat_interleave(block_size, dim=1)[:, :S]
    token_mask &= torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    scores = (q.double() @ k.double().T) * scale
    scores = scores.masked_fill(~token_mask, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.softmax(scores, dim=-1) @ v.double(), lse


def reference_moba(q, k, v, block_size, top_k, scale=None):
    """q [B, Hq, S, D], k/v [B, Hkv, S, D] -> o float64 [B, Hq, S, D], lse float64 [B, Hq, S]."""
    B, Hq, S, D = q.shape
    g = Hq // k.shape[1]
    o = torch.empty(B, Hq, S, D, dtype=torch.float64, device=q.device)
    lse = torch.empty(B, Hq, S, dtype=torch.float64, device=q.device)
    for b in range(B):
        for h in range(Hq):
            o[b, h], lse[b, h] = reference_head(q[b, h], k[b, h // g], v[b, h // g], block_size, top_k, scale)
    return o, lse


def reference_moba_varlen(q, k, v, cu_seqlens, block_size, top_k, scale=None):
    """q [T, Hq, D], k/v [T, Hkv, D] -> o float64 [T, Hq, D], lse float64 [Hq, T]."""
    o = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    lse = torch.zeros(q.shape[1], q.shape[0], dtype=torch.float64, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        batch = lambda x: x[start:end].transpose(0, 1)[None]  # noqa: E731
        o_seq, lse_seq = reference_moba(batch(q), batch(k), batch(v), block_size, top_k, scale)
        o[start:end] = o_seq[0].transpose(0, 1)
        lse[:, start:end] = lse_seq[0]
    return o, lse


def dense_causal(q, k, v, scale=None):
    """Full causal attention by SDPA in float64 (for the top_k >= N identity): [B, H, S, D]."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True, scale=scale)
