"""An independent float64 reference for MoBA (docs/design.md §1), written from the spec, not from the package.

It shares no code with moba_edu: block means by a loop over blocks, the top-k by a full sort, the
mask built query by query block, attention in float64. Routing is done in float32 as the spec says,
so that it agrees with every rung on continuous random data.

Two float32 routers (this one, the package's, the Triton kernel's) may sum a gate's products in
different orders, so on another CPU or BLAS build a near-tie between two gates can go either way.
Tests of routing therefore ask `assert_valid_routing`: is the chosen set a top-(top_k - 1) of the
float64 gates, up to float32 rounding? A wrong rule (an ineligible block, a scaled or padded gate, a
missing block) breaks that by far more than rounding does.
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


def _gates64(q, k, block_size):
    """float64 gates [S, N] of one head and a bound on float32 rounding of each: q, k [S, D]."""
    n_blocks = math.ceil(q.shape[0] / block_size)
    blocks = [k[j * block_size:(j + 1) * block_size].double() for j in range(n_blocks)]
    means = torch.stack([b.mean(0) for b in blocks]) if blocks else k.new_zeros(0, k.shape[1], dtype=torch.float64)
    sizes = torch.stack([b.abs().mean(0) for b in blocks]) if blocks else means
    gates = q.double() @ means.T
    # a float32 sum of block_size keys, then of D products: each term's rounding is at most a few
    # 2**-24 of the magnitudes summed (error bounds of recursive summation, Higham ch. 4)
    slack = 4 * (q.shape[1] + block_size) * 2.0**-24 * (q.double().abs() @ sizes.T)
    return gates, slack


def assert_valid_routing(routed, q, k, block_size, top_k):
    """Assert that routed int [S, R] of one head (q, k [S, D]), the routed blocks of each query by
    descending gate then -1 (the own block left out), is MoBA's routing up to float32 rounding.

    Exactly min(top_k - 1, own) blocks, all wholly before the own block, in descending gate order, and
    no unchosen eligible block whose float64 gate beats a chosen one by more than float32 rounding.
    """
    S, N = routed.shape[0], math.ceil(routed.shape[0] / block_size)
    routed = routed.long().cpu()
    gates, slack = _gates64(q, k, block_size)
    gates, slack = gates.cpu(), slack.cpu()
    valid = routed >= 0
    assert (valid[:, :-1] | ~valid[:, 1:]).all(), "-1 padding before a routed block"
    at = lambda x: x.gather(1, routed.clamp_min(0))  # noqa: E731
    assert ((at(gates)[:, :-1] + at(slack)[:, :-1] >= at(gates)[:, 1:]) | ~valid[:, 1:]).all(), \
        "routed blocks are not in descending gate order"
    mask = (torch.nn.functional.one_hot(routed.clamp_min(0), max(N, 1)) * valid[..., None]).sum(1).bool()[:, :N]
    assert_valid_mask(mask | (torch.arange(N)[None, :] == torch.arange(S)[:, None] // block_size),
                      q, k, block_size, top_k)


def assert_valid_mask(mask, q, k, block_size, top_k):
    """Assert that mask bool [S, N] of one head (q, k [S, D]) is MoBA's routing up to float32 rounding.

    Own block attended, no block after it, exactly min(top_k - 1, own) eligible blocks chosen, and no
    unchosen eligible block whose float64 gate beats a chosen one by more than float32 rounding.
    """
    S, N = mask.shape
    gates, slack = _gates64(q, k, block_size)
    t = torch.arange(S)[:, None]
    j = torch.arange(N)[None, :]
    own = t // block_size
    mask = mask.cpu()
    assert mask[j == own].all(), "the own block is not attended"
    assert not mask[j > own].any(), "a block after the own block is attended"
    eligible = j < own
    chosen, unchosen = mask & eligible, ~mask & eligible
    assert torch.equal(chosen.sum(1), own[:, 0].clamp(max=top_k - 1)), "wrong number of routed blocks"
    inf = torch.tensor(math.inf, dtype=torch.float64)
    worst_chosen = torch.where(chosen, gates.cpu() + slack.cpu(), inf).min(1).values
    best_unchosen = torch.where(unchosen, gates.cpu(), -inf).max(1).values
    assert (worst_chosen >= best_unchosen).all(), "an unchosen block has a clearly larger gate than a chosen one"


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
