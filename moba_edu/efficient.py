"""Rung 2: MoBA in pure PyTorch, touching only the blocks each query selected.

The dense mask of rung 1 costs O(S^2) whatever `top_k` is. This rung computes the same function with
O(S * top_k * block_size) work and memory, in three steps:

1. Own block. Query t attends keys of its own block causally. Cut the sequence into blocks and run
   ordinary causal attention inside each block: [N, block, block] score tiles, never [S, S].
2. Routed blocks. Each query also selected up to top_k - 1 whole earlier blocks. Turn the question
   around, as MoonshotAI/MoBA's efficient path does: for each (key block, key/value head), gather the
   queries that selected it and attend them to that block alone. Queries are sorted by the block
   they chose and cut into tiles of `tile_rows(block_size)` rows, so one batched matmul serves all
   blocks at once (a group's last tile is padded; padded rows are computed and dropped).
3. Merge. Every step returns, per query and key set A_i, a *partial* result: the softmax-weighted
   average o_i of the values in A_i and the log-sum-exp lse_i = log sum_{j in A_i} exp(s_j) of the
   scaled scores s_j. The sets are disjoint (a routed block lies wholly before the own block, and
   top-k never picks a block twice) and their union is exactly what the query attends, so with
   Z_i = exp(lse_i) and Z = sum_i Z_i:
       softmax over the union:  o = sum_j exp(s_j) v_j / Z = sum_i (Z_i / Z) o_i
                                lse = log Z = log sum_i exp(lse_i)
   i.e. the exact softmax, from partials weighted by exp(lse_i - lse). (`merge_partials`; the same
   rescaling is what FlashAttention (Dao et al., 2022) does between key tiles.)

Everything runs on packed tokens, flash-attn's varlen layout: q [T, Hq, D], k and v [T, Hkv, D], with
sequences cut by `cu_seqlens`; a batch [B, H, S, D] is B packed sequences of length S. Key blocks are
numbered globally in token order (`BlockTable`), so blocks restart at every sequence and no query
ever meets another sequence's keys. Grouped-query heads (Hq = g * Hkv) are handled by stacking the g
query heads that share a key/value head as extra query rows, never by repeating k and v.

Routing is routing.py's `route_indices`, without gradient (top-k is piecewise constant, as in rung 1),
with the [S, N] gates built a chunk of queries at a time. Attention is differentiated by autograd
through the gathers and scatters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks.grading import exercise
from .inputs import check_int, check_scale, check_tensors
from .routing import route_indices


def tile_rows(block_size: int) -> int:
    """Rows (queries) per routed tile: as many as a block has keys, at least 16. A tile's scores are
    [rows, block_size]; each (block, head) wastes under one tile of padding, so the padding costs at
    most as much as the own-block scores."""
    return max(16, block_size)


@dataclass
class BlockTable:
    """The key blocks of a packed batch, numbered globally in token order (NB blocks in all).

    tokens: int64 [NB, W], the token index of each slot of each block; W = min(block_size, longest
            sequence). Slots past a short block's end repeat its first token (valid there is False).
    valid:  bool [NB, W], True where the slot holds a token of the block.
    first:  int64 [n], the global number of each sequence's first block (local block j of sequence i
            is global block first[i] + j).
    """

    tokens: torch.Tensor
    valid: torch.Tensor
    first: torch.Tensor

    @staticmethod
    def build(cu_seqlens: torch.Tensor, longest: int, block_size: int) -> BlockTable:
        """cu_seqlens: int64 [n+1]; longest: the longest sequence length."""
        starts, ends = cu_seqlens[:-1], cu_seqlens[1:]
        counts = (ends - starts + block_size - 1) // block_size  # blocks per sequence; 0 when empty
        first = counts.cumsum(0) - counts
        seq = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)  # [NB]
        block_start = starts[seq] + (torch.arange(len(seq), device=seq.device) - first[seq]) * block_size
        tokens = block_start[:, None] + torch.arange(min(block_size, longest), device=seq.device)
        valid = tokens < ends[seq][:, None]
        return BlockTable(torch.where(valid, tokens, block_start[:, None]), valid, first)


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask=None):
    """Softmax attention of q [..., M, D] over k, v [..., W, D] alone: (o [..., M, D], lse [..., M]).

    mask: bool broadcastable to [..., M, W], True where the key is attended; each row needs one.
    """
    # One [..., M, W] tensor at a time: scale the small q, then turn the scores into unnormalised
    # probabilities in place. Subtracting the row max m keeps exp from overflowing; it is detached
    # because the result does not depend on it (and autograd must not see it change in place).
    scores = (q * scale) @ k.transpose(-1, -2)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    m = scores.detach().amax(dim=-1, keepdim=True)
    p = scores.sub_(m).exp_()  # exp(s - m), 0 where masked
    denom = p.sum(dim=-1, keepdim=True)
    return (p @ v) / denom, (m + denom.log()).squeeze(-1)


@exercise("nb04.check_merge_two", "nb09.check_merge_splits")
def merge_partials(o: torch.Tensor, lse: torch.Tensor):
    """Exact softmax from partial results over disjoint key sets (see the module docstring).

    o: [..., P, D] and lse [..., P] of P partials (lse = -inf for an empty one) -> (o [..., D], lse [...]).
    logsumexp subtracts the largest lse before exponentiating, so nothing overflows.
    """
    total = lse.logsumexp(dim=-1)
    weights = torch.exp(lse - total[..., None])  # Z_i / Z, summing to 1; 0 for an empty partial
    return (weights[..., None] * o).sum(dim=-2), total


def own_block_attention(q, kb, vb, table: BlockTable, scale: float):
    """Causal attention inside each query's own block.

    q: [T, Hq, D], kb, vb: [NB, Hkv, W, D] key/value blocks -> o [T, Hq, D], lse [T, Hq]. The g query
    heads sharing a key/value head are stacked as g * W query rows against one [W, D] key block:
    [NB, Hkv, g*W, W] scores.
    """
    NB, Hkv, W, D = kb.shape
    Hq = q.shape[1]
    g = Hq // Hkv
    qb = q[table.tokens].view(NB, W, Hkv, g, D).permute(0, 2, 3, 1, 4).reshape(NB, Hkv, g * W, D)
    causal = torch.ones(W, W, dtype=torch.bool, device=q.device).tril()  # key slot <= query slot
    mask = (causal & table.valid[:, None, :]).repeat(1, g, 1)[:, None]  # [NB, 1, g*W, W]
    o, lse = partial_attention(qb, kb, vb, scale, mask)
    o = o.view(NB, Hkv, g, W, D).permute(0, 3, 1, 2, 4).reshape(NB, W, Hq, D)
    lse = lse.view(NB, Hkv, g, W).permute(0, 3, 1, 2).reshape(NB, W, Hq)
    return o[table.valid], lse[table.valid]  # blocks are in token order, so this is token order


def routed_attention(q, kb, vb, routed: torch.Tensor, scale: float):
    """Attention of each query to each routed block on its own, gathered per (key block, kv head).

    q: [T, Hq, D], kb, vb: [NB, Hkv, W, D] key/value blocks, routed: int64 [T, Hq, R] global block
    numbers (-1: none) -> o [T, Hq, R, D] (0 where none), lse [T, Hq, R] (-inf where none).
    """
    T, Hq, D = q.shape
    R = routed.shape[-1]
    NB, Hkv, W, _ = kb.shape
    o = q.new_zeros(T, Hq, R, D)
    lse = q.new_full((T, Hq, R), float("-inf"))
    token, head, slot = (routed >= 0).nonzero(as_tuple=True)  # one (query, head, slot) per selection
    if token.numel() == 0:
        return o, lse
    # Sort the selections by (kv head, key block): each group's queries attend the same keys.
    group, order = ((head // (Hq // Hkv)) * NB + routed[token, head, slot]).sort(stable=True)
    token, head, slot = token[order], head[order], slot[order]
    # Cut every group into tiles of `rows` queries; selection i lands in tile `tile[i]`, row `row[i]`.
    rows = tile_rows(W)
    sizes = torch.bincount(group, minlength=Hkv * NB)
    tiles_per_group = (sizes + rows - 1) // rows
    rank = torch.arange(len(group), device=q.device) - (sizes.cumsum(0) - sizes)[group]
    tile = (tiles_per_group.cumsum(0) - tiles_per_group)[group] + rank // rows
    row = rank % rows
    tile_group = torch.repeat_interleave(torch.arange(Hkv * NB, device=q.device), tiles_per_group)
    # [tiles, W, D]: the keys of each tile's block (a routed block is never a short last block)
    kt, vt = (x[tile_group % NB, tile_group // NB] for x in (kb, vb))
    qt = q.new_zeros(len(tile_group), rows, D).index_put((tile, row), q[token, head])
    o_tiles, lse_tiles = partial_attention(qt, kt, vt, scale)
    o = o.index_put((token, head, slot), o_tiles[tile, row])
    lse = lse.index_put((token, head, slot), lse_tiles[tile, row])
    return o, lse


def attend(q, k, v, table: BlockTable, routed: torch.Tensor, scale: float):
    """MoBA on packed tokens given the routing: q [T, Hq, D], k, v [T, Hkv, D], routed [T, Hq, R]
    -> o [T, Hq, D] in q's dtype, lse [Hq, T] float32 (float64 for float64 inputs)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    if q.shape[0] == 0:  # no token: nothing to attend (and no block to reduce over)
        return q.new_zeros(q.shape), q.new_zeros(q.shape[1], 0, dtype=compute)
    qc = q.to(compute)
    kb, vb = (x.to(compute)[table.tokens].transpose(1, 2) for x in (k, v))  # [NB, Hkv, W, D] blocks
    o_own, lse_own = own_block_attention(qc, kb, vb, table, scale)
    o_routed, lse_routed = routed_attention(qc, kb, vb, routed, scale)
    o, lse = merge_partials(torch.cat([o_own[:, :, None], o_routed], dim=2),
                            torch.cat([lse_own[:, :, None], lse_routed], dim=2))
    return o.to(q.dtype), lse.transpose(0, 1)


def _global_routed(indices: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Routed columns of per-sequence indices [n, Hq, S, K] as global block numbers (-1 stays -1)."""
    routed = indices[..., 1:]
    return torch.where(routed >= 0, routed + first[:, None, None, None], routed)


def moba_attention(q, k, v, block_size: int, top_k: int, scale: float):
    """Efficient MoBA. q: [B, Hq, S, D], k, v: [B, Hkv, S, D] -> o [B, Hq, S, D] (q's dtype),
    lse [B, Hq, S] (float32; float64 for float64 inputs)."""
    return attend_indices(q, k, v, route_indices(q, k, block_size=block_size, top_k=top_k), block_size, scale)


def check_indices(indices: torch.Tensor, q: torch.Tensor, block_size: int) -> None:
    """A routing any router may hand to `attention_given_routing`: int64 [B, Hq, S, K] (K >= 1) with
    the own block t // block_size in column 0 and, after it, distinct blocks wholly before the own
    block (-1 = none). A future, repeated or own block among the routed ones raises ValueError."""
    B, Hq, S, _ = q.shape
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64:
        raise TypeError(f"indices must be an int64 tensor, got {getattr(indices, 'dtype', type(indices).__name__)}")
    if indices.dim() != 4 or tuple(indices.shape[:3]) != (B, Hq, S) or (S and indices.shape[3] < 1):
        raise ValueError(f"indices must have shape [B, Hq, S, K] = [{B}, {Hq}, {S}, K >= 1], "
                         f"got {tuple(indices.shape)}")
    own = torch.arange(S, device=q.device) // block_size
    if S and not (indices[..., 0] == own).all():
        raise ValueError("indices[..., 0] must be each query's own block t // block_size")
    routed = indices[..., 1:]
    if ((routed < -1) | (routed >= own[:, None])).any():
        raise ValueError("indices may route only to blocks wholly before the own block (j < t // block_size) or -1")
    ordered = routed.sort(dim=-1).values
    if ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any():
        raise ValueError("indices must not route a query to the same block twice")


def attention_given_routing(q, k, v, indices, block_size: int, scale=None):
    """Exact attention over the blocks a router chose: any router's `Routing.indices` form.

    q: [B, Hq, S, D], k, v: [B, Hkv, S, D], indices: int64 [B, Hq, S, K] (see `check_indices`)
    -> o [B, Hq, S, D] (q's dtype), lse [B, Hq, S]. scale defaults to 1/sqrt(D). With MoBA's own
    routing this is `moba_attention`; `moba_edu.variants` feeds it other routers' choices.
    """
    check_tensors(q, k, v, rank=4, layout="[B,H,S,D]", caller="attention_given_routing")
    block_size = check_int(block_size, "block_size")
    check_indices(indices, q, block_size)
    return attend_indices(q, k, v, indices, block_size, check_scale(scale, q.shape[-1]))


def attend_indices(q, k, v, indices, block_size: int, scale: float):
    """`attend` on a batch [B, H, S, D] given valid indices [B, Hq, S, K]: o [B, Hq, S, D], lse [B, Hq, S]."""
    B, Hq, S, D = q.shape
    table = BlockTable.build(torch.arange(B + 1, device=q.device) * S, S, block_size)
    routed = _global_routed(indices, table.first)
    routed = routed.transpose(1, 2).reshape(B * S, Hq, routed.shape[-1])  # [T, Hq, R]
    pack = lambda x: x.transpose(1, 2).reshape(B * S, x.shape[1], D)  # noqa: E731  [B,H,S,D] -> [T,H,D]
    o, lse = attend(pack(q), pack(k), pack(v), table, routed, scale)
    return o.view(B, S, Hq, D).transpose(1, 2).contiguous(), lse.view(Hq, B, S).transpose(0, 1).contiguous()


def moba_attention_varlen(q, k, v, cu_seqlens, block_size: int, top_k: int, scale: float):
    """Efficient MoBA on packed sequences. q: [T, Hq, D], k, v: [T, Hkv, D], cu_seqlens [n+1]
    -> o [T, Hq, D], lse [Hq, T].

    The router pads the sequences to a [n, H, longest, D] grid (routing.py works on that layout; a
    padded position's routing is never read); attention runs on the packed tokens.
    """
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    longest = int(lengths.max()) if len(lengths) else 0
    table = BlockTable.build(cu, longest, block_size)
    position = torch.arange(longest, device=q.device)
    real = position < lengths[:, None]  # [n, longest]
    grid = torch.where(real, cu[:-1, None] + position, 0)  # token of each grid cell (0 where padding)
    padded = lambda x: x.detach()[grid].transpose(1, 2)  # noqa: E731  [T,H,D] -> [n,H,longest,D]
    indices = route_indices(padded(q), padded(k), block_size=block_size, top_k=top_k)
    routed = _global_routed(indices, table.first).transpose(1, 2)[real]  # [T, Hq, R]
    return attend(q, k, v, table, routed, scale)
