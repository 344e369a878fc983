"""The MoBA forward in Triton: a block-major schedule, partial results merged by log-sum-exp.

Why block-major. Each query attends its own block (causally) and R = top_k - 1 routed earlier blocks,
and neighbouring queries route differently. A query-major kernel (one program per query tile walking
the union of its rows' blocks) visits every block that *any* of its rows chose: with random routing,
64 queries choosing 2 of 128 eligible blocks touch about 128 * (1 - (1 - 2/128)**64) = 81 blocks to
use 2, forty times the work. Block-major turns the question around, as MoonshotAI/MoBA's efficient
path and FlashMoBA (Xiao et al., 2025) do: for every (key block, query head) gather the queries that
chose it (router.py's `schedule`), and let one program load the block's keys once for a tile of
BLOCK_M such queries. Every key tile then serves a full query tile, as in dense FlashAttention.

Combining. A query's result is spread over R + 1 programs (its own block, R routed blocks). Each
routed program writes a *partial* result per pair: the softmax-weighted average of the block's values
and the log-sum-exp of its scaled scores (FlashAttention's (o, lse) pair, normalised). A second
kernel, `_own_block_merge_kernel`, one program per query tile, computes the own block causally
(FlashAttention-2's diagonal stages, reusing flash.py's `attend_tile`) and merges in the R partials
exactly by log-sum-exp:
    o = sum_i exp(lse_i - lse) o_i,  lse = log sum_i exp(lse_i)
(the same rescaling FlashAttention does between key tiles; see efficient.py's docstring).
Holding every partial at once would take S * R * Hq * D values, 11x the output at top_k = 12 and a
million tokens, so queries are processed in chunks of tiles whose partial buffer fits a budget
(`partial_budget`, by default twice the size of q: layout.default_partial_budget): chunk after
chunk, the routed kernel writes the chunk's partials and the own-block merge kernel consumes them.
The alternative, two passes with an exact normalisation (first every query's lse, then atomically
adding exp(s - lse) @ V into a float32 output), needs no buffer but computes Q K^T twice: 1.5x the
FLOPs for a memory saving we do not need.

Shapes: q [B, Hq, S, D] or [T, Hq, D]; k, v with Hkv heads; o like q; lse float32 [Hq, T] (layout.py's
token numbering). Partial outputs are kept in the input dtype (float32 for float32 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .flash import attend_tile
from .layout import (LN2, LOG2E, LOG2E_K, default_partial_budget, layout, row_offset, strides, tile_header,
                     tiles_per_chunk)
from .router import block_means, packed_route, pair_counts, schedule


@triton.jit
def _routed_kernel(q_ptr, k_ptr, v_ptr, po_ptr, plse_ptr, pair_offsets, pair_slot, tile_offsets, tile_bucket,
                   blocks_ptr,
                   L, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh, Hq, GROUP, R, NB, chunk, chunk_token0, chunk_len,
                   bucket_lo, bucket_hi, block_size, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, RAGGED: tl.constexpr):
    """One program: a tile of BLOCK_M routed pairs of one (key block, query head) bucket -> their partial
    (normalised output, lse). The grid is an upper bound on the chunk's tiles; spare programs return."""
    tile = tl.load(tile_offsets + bucket_lo) + tl.program_id(0)
    if tile >= tl.load(tile_offsets + bucket_hi):
        return
    lo = tl.load(tile_bucket + tile)   # the bucket whose tiles hold `tile` (layout.Schedule.tile_table)
    h = lo % Hq
    b = lo // Hq - chunk * NB
    first = tl.load(pair_offsets + lo) + (tile - tl.load(tile_offsets + lo)) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = first + offs_m < tl.load(pair_offsets + lo + 1)
    slot = tl.load(pair_slot + first + offs_m, mask=row_ok, other=0)
    t = slot // R
    r = slot % R
    d_ok = (offs_d < HEAD_DIM)[None, :]
    q_rows = q_ptr + row_offset(t, h, L, stride_qb, stride_qs, stride_qh)
    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok, other=0.0)   # gathered rows
    key0 = tl.load(blocks_ptr + 2 * b)
    k_block = k_ptr + row_offset(key0, h // GROUP, L, stride_kb, stride_ks, stride_kh)
    v_block = v_ptr + row_offset(key0, h // GROUP, L, stride_vb, stride_vs, stride_vh)
    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # A routed block lies wholly before its queries: no causal cut. attend_tile's diagonal mask
    # (query >= key, keys < block_size) is needed only to cut a ragged last key tile, so the queries
    # are placed at the block's last key.
    last_key = tl.full((BLOCK_M,), 0, tl.int32) + block_size - 1
    for n0 in range(0, block_size, BLOCK_N):
        # Addresses from a scalar base each step: a loop-carried [BLOCK_N, BLOCK_D] pointer tensor
        # would pin 2 x 64 registers per thread and spill.
        offs = (n0 + offs_n)[:, None]
        acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k_block + offs * stride_ks + offs_d[None, :],
                                    v_block + offs * stride_vs + offs_d[None, :], last_key, n0 + offs_n, offs_d,
                                    block_size, qk_scale, HEAD_DIM, DIAGONAL=RAGGED)
    # The pairs' rows again (an L2 hit), so that t, r and row_ok need no registers through the loop.
    row_ok = first + offs_m < tl.load(pair_offsets + lo + 1)
    slot = tl.load(pair_slot + first + offs_m, mask=row_ok, other=0)
    part = (h * chunk_len + (slot // R - chunk_token0)).to(tl.int64) * R + slot % R
    tl.store(po_ptr + part[:, None] * BLOCK_D + offs_d[None, :], (acc / l_i[:, None]).to(po_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(plse_ptr + part, (m_i + tl.log2(l_i)) * LN2, mask=row_ok)


@triton.jit
def _own_block_merge_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, routed_ptr, po_ptr, plse_ptr, tiles_ptr,
                      L, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                      stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                      T, GROUP, R, tile0, chunk_token0, chunk_len, block_size, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """One program: a query tile (inside one block) of one head. Own block causally, then the merge of
    the R routed partials; writes o and lse."""
    tile = tile0 + tl.program_id(0)
    h = tl.program_id(1)
    token0, pos0, rows, _ = tile_header(tiles_ptr, tile)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < rows
    d_ok = (offs_d < HEAD_DIM)[None, :]
    t = token0 + offs_m
    pos = pos0 + offs_m
    q = tl.load(q_ptr + row_offset(t, h, L, stride_qb, stride_qs, stride_qh)[:, None] + offs_d[None, :],
                mask=row_ok[:, None] & d_ok, other=0.0)
    block_lo = (pos0 // block_size) * block_size
    seq0 = token0 - pos0                      # the sequence's first token: keys are at seq0 + position
    k_seq = k_ptr + row_offset(seq0, h // GROUP, L, stride_kb, stride_ks, stride_kh)
    v_seq = v_ptr + row_offset(seq0, h // GROUP, L, stride_vb, stride_vs, stride_vh)
    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # Own block, as flash.py's two stages: key tiles of the block before the query tile (no mask; the
    # tile starts a multiple of BLOCK_M >= BLOCK_N after the block), then the causal diagonal.
    for n0 in range(block_lo, pos0, BLOCK_N):
        offs = (n0 + offs_n)[:, None]       # addresses from a scalar base each step (see _routed_kernel)
        acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k_seq + offs * stride_ks + offs_d[None, :],
                                    v_seq + offs * stride_vs + offs_d[None, :], pos, n0 + offs_n, offs_d,
                                    pos0 + rows, qk_scale, HEAD_DIM, DIAGONAL=False)
    for n0 in range(pos0, pos0 + rows, BLOCK_N):
        offs = (n0 + offs_n)[:, None]
        acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k_seq + offs * stride_ks + offs_d[None, :],
                                    v_seq + offs * stride_vs + offs_d[None, :], pos, n0 + offs_n, offs_d,
                                    pos0 + rows, qk_scale, HEAD_DIM, DIAGONAL=True)
    # Merge the routed partials (o_r normalised, lse_r natural): exact softmax over the union of keys.
    routed_rows = routed_ptr + (h * T + t).to(tl.int64) * R
    part_rows = (h * chunk_len + (t - chunk_token0)).to(tl.int64) * R
    for r in range(R):
        has = tl.load(routed_rows + r, mask=row_ok, other=-1) >= 0
        part_lse = tl.load(plse_ptr + part_rows + r, mask=has, other=-float("inf")) * LOG2E_K
        part_o = tl.load(po_ptr + (part_rows + r)[:, None] * BLOCK_D + offs_d[None, :], mask=has[:, None],
                         other=0.0).to(tl.float32)
        m_new = tl.maximum(m_i, part_lse)
        alpha = tl.exp2(m_i - m_new)
        beta = tl.exp2(part_lse - m_new)      # 0 where the query has no r-th routed block
        acc = acc * alpha[:, None] + part_o * beta[:, None]
        l_i = l_i * alpha + beta
        m_i = m_new
    o_ptrs = o_ptr + row_offset(t, h, L, stride_ob, stride_os, stride_oh)[:, None] + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok)
    tl.store(lse_ptr + (h * T + t).to(tl.int64), (m_i + tl.log2(l_i)) * LN2, mask=row_ok)


def launch_config(head_dim: int) -> dict:
    """Tiles and warps per head dim (BLOCK_D = next_power_of_2(head_dim): 160 and 192 run as 256, the
    padding masked). From 65 to 128: routed tiles of 64 gathered queries x 64 keys, own-block key tiles
    of 64 (the 64-query tile is the layout's, layout.query_tile), both on 4 warps and 3 stages, so that
    two programs share an SM and hide each other's prologue and epilogue: on the H200 the fastest of
    eight routed and seven own-block shapes at 32K and 128K (figures/bench/h200/moba_fwd_tiles-*.json;
    the own-block kernel gained 8-13% over 8 warps). Up to 64: routed 128 x 64 on 4 warps. Past 128 the
    [BLOCK_M, 256] float32 accumulator and the staged key/value tiles double: routed 64 x 32 on 4 warps
    and 2 stages (the fastest of four shapes on the H200 at D = 256, 4.9 ms against 6.0 for 64 x 64 on
    8 warps; notes/gpu_forward.md), own-block key tiles of 32 (96 KB, 240 B of stack),
    notes/gpu_forward.md's compile table. Under the interpreter, 16 x 16 tiles keep tests quick."""
    if INTERPRET:
        return dict(routed=dict(BLOCK_M=16, BLOCK_N=16), own=dict(BLOCK_N=16))
    if head_dim > 128:
        return dict(routed=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
                    own=dict(BLOCK_N=32, num_warps=8, num_stages=2))
    if head_dim <= 64:
        return dict(routed=dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
                    own=dict(BLOCK_N=64, num_warps=8, num_stages=3))
    return dict(routed=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
                own=dict(BLOCK_N=64, num_warps=4, num_stages=3))


def moba_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: tuple, block_size: int,
                 top_k: int, scale: float, partial_budget: int | None = None, config: dict | None = None):
    """MoBA forward over sequences of the given lengths.

    q [B, Hq, S, D] (lengths = (S,) * B) or [T, Hq, D] (lengths from cu_seqlens); k, v with Hkv heads;
    last dims contiguous; float16, bfloat16 or float32 (on a GPU). Returns o (q's layout and dtype),
    lse float32 [Hq, T] and the router's `Schedule` (what the backward needs). `partial_budget` (bytes)
    bounds the buffer of routed partials; `config` overrides `launch_config` (for tuning).
    """
    batched = q.dim() == 4
    Hq, D = q.shape[1], q.shape[-1]     # the head axis is axis 1 in both layouts
    lay = layout(tuple(lengths), block_size, q.device, batched)
    block_d = max(16, triton.next_power_of_2(D))
    R = lay.routed_slots(top_k)
    budget = partial_budget if partial_budget is not None else default_partial_budget(q)
    chunk_tiles = tiles_per_chunk(lay, Hq, R, block_d, q.element_size(), budget)
    counts = pair_counts(lay, Hq, chunk_tiles, q.device)
    routed = packed_route(q, block_means(k, lay), lay, top_k, counts, chunk_tiles)   # counts pairs too
    sched = schedule(routed, lay, chunk_tiles, counts)
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(Hq, lay.T, dtype=torch.float32, device=q.device)
    if lay.T == 0:
        return o, lse, sched
    chunk_len = max(b - a for a, b in zip(sched.chunk_tokens[:-1], sched.chunk_tokens[1:]))
    partial_o = torch.empty(Hq, chunk_len, R, block_d, dtype=q.dtype, device=q.device)
    partial_lse = torch.empty(Hq, chunk_len, R, dtype=torch.float32, device=q.device)
    config = config or launch_config(D)
    routed_cfg, own_cfg = config["routed"], config["own"]
    tile_offsets, tile_bucket = sched.tile_table(routed_cfg["BLOCK_M"]) if R else (None, None)
    qk_scale = scale * LOG2E
    dims = dict(HEAD_DIM=D, BLOCK_D=block_d)
    qkv_strides = (*strides(q), *strides(k), *strides(v))
    for c in range(sched.n_chunks):
        token0, token1 = sched.chunk_tokens[c], sched.chunk_tokens[c + 1]
        bucket_lo, bucket_hi = sched.buckets(c)
        if R:
            most_tiles = -(-(token1 - token0) * Hq * R // routed_cfg["BLOCK_M"]) + lay.NB * Hq
            _routed_kernel[(most_tiles,)](
                q, k, v, partial_o, partial_lse, sched.pair_offsets, sched.pair_slot, tile_offsets, tile_bucket,
                lay.blocks,
                lay.L, *qkv_strides, Hq, Hq // k.shape[1], R, lay.NB, c, token0, chunk_len,
                bucket_lo, bucket_hi, block_size, qk_scale, RAGGED=block_size % routed_cfg["BLOCK_N"] != 0,
                **dims, **routed_cfg)
        tile0 = c * sched.tiles_per_chunk
        n_tiles = min(lay.NT, tile0 + sched.tiles_per_chunk) - tile0
        _own_block_merge_kernel[(n_tiles, Hq)](
            q, k, v, o, lse, routed, partial_o, partial_lse, lay.tiles, lay.L, *qkv_strides, *strides(o),
            lay.T, Hq // k.shape[1], R, tile0, token0, chunk_len, block_size, qk_scale,
            BLOCK_M=lay.QT, **dims, **own_cfg)
    return o, lse, sched
