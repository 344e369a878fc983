"""The MoBA backward in Triton: dQ, dK and dV from the forward's saved log-sum-exp (notebook 07).

The math is FlashAttention-2's backward (Dao, 2023) restricted to the keys each query attended. With
the scaled scores s_tj = scale * q_t . k_j, the probabilities recomputed from the saved log-sum-exp
P_tj = exp(s_tj - lse_t) (never stored), and the row term Delta_t = dO_t . O_t:

    dV_j += P_tj dO_t            dP_tj = dO_t . V_j            dS_tj = P_tj (dP_tj - Delta_t)
    dK_j += scale dS_tj q_t      dQ_t  += scale dS_tj K_j

Delta_t equals sum_j P_tj dP_tj because O_t = sum_j P_tj V_j: the softmax Jacobian's row term, once per
query instead of once per key tile. The routing is not differentiated (top-k is piecewise constant):
the chosen set is a constant of the backward pass, exactly as in the reference.

Kernels, in launch order (layout.py's token numbering, `Layout` and block-major `Schedule`):
1. `_delta_kernel`: Delta = rowsum(dO * O), float32 [Hq, T].
2. `_dkdv_kernel`, block-major: one program per (key tile, kv head) holds its tile's K and V and float32
   dK, dV accumulators in registers and walks every query that attended the tile: the own-block queries
   at or after the tile (contiguous, causal mask), then the routed queries gathered from the schedule's
   buckets, for each of the g query heads of the kv head (grouped-query attention: dK and dV sum over
   the group with no atomics, since one program owns the tile). dK and dV are written once. The routed
   queries' dQ terms dS K go into a float32 accumulator by atomic adds, as FlashAttention-2 does.
3. `_dq_kernel`, query-major inside the own block: one program per (query tile, query head) walks its
   block's keys up to the diagonal, adds the routed terms, scales and writes dQ in the input dtype.

Routed dQ per slot (`launch_config`'s DQ = "slots", from SLOTS_FROM_BLOCK keys per block, and always in
deterministic mode). The atomic adds above cost one float32 row add per routed pair and key tile: at
128K tokens with (512, 3), 8.6 GB of atomic traffic into an accumulator L2 cannot hold. Instead
`_dkdv_kernel` skips dQ, and `_dq_routed_kernel` (one program per tile of a bucket's routed queries,
walking all the block's keys) writes each (query, head, routed slot) term to its own float32 row, which
`_dq_kernel` adds over the R slots in order. It recomputes the routed scores and dP (10 D -> 14 D
FLOPs per routed pair) and needs a float32 buffer of Hq * tokens * R * D, bounded by doing the query
tiles in chunks (layout.py's `tiles_per_chunk`, as the forward does). Deterministic mode
(`torch.are_deterministic_algorithms_enabled()`) also sorts every bucket (`sorted_pairs`): the
buckets are filled in atomic arrival order, and dK, dV sum over them.

Shapes: q, o, do [B, Hq, S, D] or [T, Hq, D]; k, v with Hkv heads; lse float32 [Hq, T].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .layout import (LOG2E, LOG2E_K, Layout, Schedule, default_partial_budget, row_offset, strides, tile_header,
                     tiles_per_chunk)
from .router import schedule

# The block size from which the routed dQ is summed per slot rather than by atomic adds (launch_config): on
# the H200 per slot was 14% faster at (4096, 12) and 32K tokens, 3-58% slower at (512, 3) and (128, 8)
# (figures/bench/h200/bwd_dq-*.json).
SLOTS_FROM_BLOCK = 4096


@triton.jit
def _delta_kernel(o_ptr, do_ptr, delta_ptr, L, stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh,
                  T, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] in float32; grid (cdiv(T, BLOCK_T), Hq)."""
    h = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (t < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(o_ptr + row_offset(t, h, L, stride_ob, stride_os, stride_oh)[:, None] + offs_d[None, :], mask=ok,
                other=0.0)
    do = tl.load(do_ptr + row_offset(t, h, L, stride_db, stride_ds, stride_dh)[:, None] + offs_d[None, :], mask=ok,
                 other=0.0)
    tl.store(delta_ptr + h.to(tl.int64) * T + t, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1), mask=t < T)


@triton.jit
def _rel(t, t0, WIDE: tl.constexpr):
    """t - t0 as the offsets' integer type: int32, or int64 when WIDE."""
    rel = t - t0
    if WIDE:
        rel = rel.to(tl.int64)
    return rel


@triton.jit
def _rows(ptr, t0, t, h, L, stride_b, stride_s, stride_h, offs_d, WIDE: tl.constexpr):
    """[M, BLOCK_D] addresses of rows (token t, head h), every t in token t0's sequence: one 64-bit base,
    layout.row_offset of t0, plus 32-bit offsets from it. (layout.row_offset per row, a 64-bit t // L
    and t % L for each, held so many registers that the kernels spilled kilobytes per thread.) WIDE:
    a sequence spans 2**31 elements or more, so the offsets stay 64-bit."""
    base = ptr + row_offset(t0, h, L, stride_b, stride_s, stride_h)
    return base + (_rel(t, t0, WIDE) * stride_s)[:, None] + offs_d[None, :]


@triton.jit
def _query_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, t0, t, h, row_ok, offs_d, L, stride_qb, stride_qs, stride_qh,
                stride_db, stride_ds, stride_dh, T, HEAD_DIM: tl.constexpr, WIDE: tl.constexpr):
    """Load what a query tile brings to the backward: q, dO [M, BLOCK_D] rows of tokens t (head h; all in
    token t0's sequence), lse * log2(e) and Delta [M] (zeros on masked rows)."""
    ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(_rows(q_ptr, t0, t, h, L, stride_qb, stride_qs, stride_qh, offs_d, WIDE), mask=ok, other=0.0)
    do = tl.load(_rows(do_ptr, t0, t, h, L, stride_db, stride_ds, stride_dh, offs_d, WIDE), mask=ok, other=0.0)
    row = h.to(tl.int64) * T + t0 + (t - t0)
    lse2 = tl.load(lse_ptr + row, mask=row_ok, other=0.0) * LOG2E_K
    delta = tl.load(delta_ptr + row, mask=row_ok, other=0.0)
    return q, do, lse2, delta


@triton.jit
def _tile_scores(q, do, lse2, delta, k, v, visible, qk_scale):
    """Recompute one [M, N] tile: P = exp(scale q.k - lse) and dS = P (dO . v - Delta), float32.

    visible bool [M, N] is False on padding rows, keys past the block and causally hidden keys; P and
    dS are 0 there, so a row with nothing visible adds nothing (never NaN: exp2 overflows only to inf,
    which `where` discards)."""
    s = tl.dot(q, tl.trans(k))
    p = tl.where(visible, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v))
    return p, p * (dp - delta[:, None])


@triton.jit
def _accumulate_kv(dk, dv, q, do, lse2, delta, k, v, visible_t, qk_scale):
    """Fold a query tile into a key tile's dK, dV (unscaled dK); returns dS^T too, for the dQ terms.

    Computed transposed, as FlashAttention-2's Triton backward does: S^T = K Q^T and dP^T = V dO^T are
    [N, M] tiles, so every matrix product here has the key tile's N rows as its M dimension (Hopper's
    wgmma takes 64 rows per warp group: a key tile of 128 fills two, whatever the query tile is).
    visible_t bool [N, M]. P and dS are rounded to the input dtype for the tensor cores, as in
    FlashAttention-2.
    """
    st = tl.dot(k, tl.trans(q))
    pt = tl.where(visible_t, tl.exp2(st * qk_scale - lse2[None, :]), 0.0)
    dpt = tl.dot(v, tl.trans(do))
    dst = pt * (dpt - delta[None, :])
    dv = tl.dot(pt.to(do.dtype), do, dv)
    dk = tl.dot(dst.to(q.dtype), q, dk)
    return dk, dv, dst


@triton.jit
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_acc_ptr,
                 blocks_ptr, pair_offsets, pair_slot, L,
                 stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                 stride_db, stride_ds, stride_dh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs,
                 stride_dvh, T, Hq, NB, GROUP, R, n_chunks, scale, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 TILES_PER_BLOCK: tl.constexpr, ATOMIC_DQ: tl.constexpr, WIDE: tl.constexpr):
    """dK, dV of one key tile, and by atomics the routed queries' dQ terms; grid (NB * TILES_PER_BLOCK, Hkv)."""
    b = tl.program_id(0) // TILES_PER_BLOCK
    hk = tl.program_id(1)
    token0 = tl.load(blocks_ptr + 2 * b)
    block_end = token0 + tl.load(blocks_ptr + 2 * b + 1)
    n0 = token0 + (tl.program_id(0) % TILES_PER_BLOCK) * BLOCK_N
    if n0 < block_end:                                         # key tiles past a short block do nothing
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < block_end
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        kv_ok = key_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(_rows(k_ptr, n0, keys, hk, L, stride_kb, stride_ks, stride_kh, offs_d, WIDE), mask=kv_ok, other=0.0)
        v = tl.load(_rows(v_ptr, n0, keys, hk, L, stride_vb, stride_vs, stride_vh, offs_d, WIDE), mask=kv_ok, other=0.0)
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for j in range(GROUP):                                 # the g query heads that read this kv head
            h = hk * GROUP + j
            # Own block: queries n0 .. block_end - 1 see the tile's keys up to themselves.
            for m0 in range(n0, block_end, BLOCK_M):
                t = m0 + offs_m
                row_ok = t < block_end
                q, do, lse2, delta = _query_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, n0, t, h, row_ok, offs_d, L,
                                                 stride_qb, stride_qs, stride_qh, stride_db, stride_ds, stride_dh,
                                                 T, HEAD_DIM, WIDE)
                visible_t = key_ok[:, None] & row_ok[None, :] & (t[None, :] >= keys[:, None])
                dk, dv, dst = _accumulate_kv(dk, dv, q, do, lse2, delta, k, v, visible_t, qk_scale)
            # Routed: the queries of head h that chose block b, from the bucket of each chunk. A routed
            # block lies wholly before its queries' own block: no causal mask.
            for c in range(n_chunks):
                bucket = (c * NB + b) * Hq + h
                lo = tl.load(pair_offsets + bucket)
                hi = tl.load(pair_offsets + bucket + 1)
                for m0 in range(lo, hi, BLOCK_M):
                    row_ok = m0 + offs_m < hi
                    t = tl.load(pair_slot + m0 + offs_m, mask=row_ok, other=0) // R
                    q, do, lse2, delta = _query_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, n0, t, h, row_ok, offs_d, L,
                                                     stride_qb, stride_qs, stride_qh, stride_db, stride_ds,
                                                     stride_dh, T, HEAD_DIM, WIDE)
                    visible_t = key_ok[:, None] & row_ok[None, :]
                    dk, dv, dst = _accumulate_kv(dk, dv, q, do, lse2, delta, k, v, visible_t, qk_scale)
                    if ATOMIC_DQ:                              # dq_acc[h, t] += dS K (unscaled, float32)
                        dq = tl.dot(tl.trans(dst.to(k.dtype)), k)
                        acc = dq_acc_ptr + (h.to(tl.int64) * T + n0) * BLOCK_D
                        tl.atomic_add(acc + (_rel(t, n0, WIDE) * BLOCK_D)[:, None] + offs_d[None, :], dq,
                                      mask=row_ok[:, None], sem="relaxed")
        tl.store(_rows(dk_ptr, n0, keys, hk, L, stride_dkb, stride_dks, stride_dkh, offs_d, WIDE),
                 (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_ok)
        tl.store(_rows(dv_ptr, n0, keys, hk, L, stride_dvb, stride_dvs, stride_dvh, offs_d, WIDE),
                 dv.to(dv_ptr.dtype.element_ty), mask=kv_ok)


@triton.jit
def _dq_routed_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, part_ptr, blocks_ptr, pair_offsets,
                      pair_slot, tile_offsets, tile_bucket, L, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks,
                      stride_kh, stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
                      T, Hq, NB, GROUP, R, chunk, chunk_token0, chunk_len, bucket_lo, bucket_hi, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      WIDE: tl.constexpr):
    """Routed dQ without atomics, one program per tile of BLOCK_M pairs of one (key block, query head)
    bucket of a chunk (layout.Schedule.tile_table, as the forward's routed kernel): part[h, t -
    chunk_token0, r] = sum over block b's keys of dS K, one row per pair (t, r). The grid is an upper
    bound on the chunk's tiles; spare programs return."""
    tile = tl.load(tile_offsets + bucket_lo) + tl.program_id(0)
    if tile >= tl.load(tile_offsets + bucket_hi):
        return
    lo = tl.load(tile_bucket + tile)
    h = lo % Hq
    b = lo // Hq - chunk * NB
    hk = h // GROUP
    token0 = tl.load(blocks_ptr + 2 * b)
    block_end = token0 + tl.load(blocks_ptr + 2 * b + 1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    first = tl.load(pair_offsets + lo) + (tile - tl.load(tile_offsets + lo)) * BLOCK_M
    row_ok = first + offs_m < tl.load(pair_offsets + lo + 1)
    pair = tl.load(pair_slot + first + offs_m, mask=row_ok, other=0)
    t = pair // R
    q, do, lse2, delta = _query_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, token0, t, h, row_ok, offs_d, L,
                                     stride_qb, stride_qs, stride_qh, stride_db, stride_ds, stride_dh,
                                     T, HEAD_DIM, WIDE)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(token0, block_end, BLOCK_N):
        keys = n0 + offs_n
        key_ok = keys < block_end
        kv_ok = key_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(_rows(k_ptr, token0, keys, hk, L, stride_kb, stride_ks, stride_kh, offs_d, WIDE), mask=kv_ok,
                    other=0.0)
        v = tl.load(_rows(v_ptr, token0, keys, hk, L, stride_vb, stride_vs, stride_vh, offs_d, WIDE), mask=kv_ok,
                    other=0.0)
        p, ds = _tile_scores(q, do, lse2, delta, k, v, row_ok[:, None] & key_ok[None, :], qk_scale)
        acc = tl.dot(ds.to(k.dtype), k, acc)
    base = part_ptr + (h * chunk_len + token0 - chunk_token0).to(tl.int64) * R * BLOCK_D
    rows = (_rel(t, token0, WIDE) * R + pair % R) * BLOCK_D
    tl.store(base + rows[:, None] + offs_d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, routed_dq_ptr, tiles_ptr, L,
               stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
               stride_db, stride_ds, stride_dh, stride_dqb, stride_dqs, stride_dqh,
               T, GROUP, tile0, chunk_token0, chunk_len, block_size, scale, qk_scale,
               SLOTS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, WIDE: tl.constexpr):
    """dQ of one query tile (layout.py's tiles): own block up to the diagonal, plus the routed terms
    routed_dq [Hq, chunk_len, SLOTS, BLOCK_D] float32 (SLOTS = 1: the atomic accumulator; else the R
    slots, summed in order); grid (tiles of the chunk, Hq)."""
    tile = tile0 + tl.program_id(0)
    h = tl.program_id(1)
    hk = h // GROUP
    token0, pos0, rows, _ = tile_header(tiles_ptr, tile)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < rows
    t = token0 + offs_m
    q, do, lse2, delta = _query_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, token0, t, h, row_ok, offs_d, L,
                                     stride_qb, stride_qs, stride_qh, stride_db, stride_ds, stride_dh, T, HEAD_DIM,
                                     WIDE)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    block_token0 = token0 - pos0 % block_size                 # the own block's first key
    for n0 in range(block_token0, token0 + rows, BLOCK_N):   # keys up to the tile's last row
        keys = n0 + offs_n
        kv_ok = (keys < token0 + rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(_rows(k_ptr, token0, keys, hk, L, stride_kb, stride_ks, stride_kh, offs_d, WIDE), mask=kv_ok,
                    other=0.0)
        v = tl.load(_rows(v_ptr, token0, keys, hk, L, stride_vb, stride_vs, stride_vh, offs_d, WIDE), mask=kv_ok,
                    other=0.0)
        visible = row_ok[:, None] & (t[:, None] >= keys[None, :])   # causal; also hides keys past the tile
        p, ds = _tile_scores(q, do, lse2, delta, k, v, visible, qk_scale)
        acc = tl.dot(ds.to(k.dtype), k, acc)
    base = routed_dq_ptr + (h * chunk_len + token0 - chunk_token0).to(tl.int64) * SLOTS * BLOCK_D
    rows = _rel(t, token0, WIDE) * SLOTS * BLOCK_D
    for r in range(SLOTS):                                    # fixed order: deterministic
        acc += tl.load(base + (rows + r * BLOCK_D)[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    tl.store(_rows(dq_ptr, token0, t, h, L, stride_dqb, stride_dqs, stride_dqh, offs_d, WIDE),
             (acc * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


def launch_config(head_dim: int, block_size: int) -> dict:
    """Tiles, warps and the routed dQ's path per head dim and block size.

    dK/dV and dQ kernels (BLOCK_M, BLOCK_N, num_warps, num_stages). Under the interpreter the smallest
    tiles tl.dot takes. On a GPU up to head dim 128 (the H200 sweeps in
    figures/bench/h200/bwd_tiles-*.json), key tiles of 128 keys with float32 dK and dV [128, D] in
    registers of 8 warps, and query tiles of 32 streaming past: FlashAttention-2's Triton backward
    shape, with 3 stages (10-11% faster than 2 at 128K with (512, 3) and (128, 8)). Past 128
    (BLOCK_D = 256; 160 and 192 padded) dK and dV of 64 keys spill 136-848 B per thread (sm_90):
    32 x 32 tiles compile without spills in every kernel, and on 4 warps ran fastest of five shapes on
    the H200 at D = 256 (13.9 ms against 23.5 on 8 warps; notes/gpu_backward.md). The dQ kernel's
    query tile is the router's (64).

    DQ: how the routed queries' dQ terms are summed. "atomic": the dK/dV kernel adds dS K into a
    float32 accumulator per key tile (FlashAttention-2's way; block_size / BLOCK_N atomic row adds per
    pair). "slots": the dK/dV kernel skips dQ and `_dq_routed_kernel` recomputes each routed pair's
    scores query-major, summing the whole block in registers and writing one row per (query, slot),
    which the dQ kernel adds in order (deterministic mode always takes it). dq_routed: its tiles.
    """
    dq = "slots" if block_size >= SLOTS_FROM_BLOCK else "atomic"
    if INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=16, DQ=dq, dq_routed=dict(BLOCK_M=16, BLOCK_N=16))
    if head_dim > 128:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2, DQ=dq,
                    dq_routed=dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2))
    return dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3, DQ=dq,
                dq_routed=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2))


def sorted_pairs(sched: Schedule) -> torch.Tensor:
    """The schedule's pair_slot with every bucket sorted (buckets are filled in atomic arrival order;
    a sum over a bucket must see one order for bitwise-reproducible dK, dV). Shapes stay static."""
    offsets, slots = sched.pair_offsets, sched.pair_slot
    position = torch.arange(slots.numel(), device=slots.device, dtype=torch.int32)
    bucket = torch.searchsorted(offsets[1:], position, right=True).to(torch.int64)  # past the last pair: n_buckets
    span = sched.layout.T * max(sched.R, 1)
    keys = bucket * span + torch.where(bucket < offsets.numel() - 1, slots, 0).to(torch.int64)
    return (keys.sort().values % span).to(torch.int32)         # keys are unique: any sort gives one order


def moba_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, routed: torch.Tensor, lay: Layout, scale: float,
                  deterministic: bool | None = None, partial_budget: int | None = None,
                  dlse: torch.Tensor | None = None, config: dict | None = None):
    """Gradients of MoBA given the forward's o, lse [Hq, T] and routing `routed` int32 [Hq, T, R].

    do, q, o [B, Hq, S, D] or [T, Hq, D]; k, v with Hkv heads; lay: layout.layout(...) of the input.
    Returns dq, dk, dv (each in its input's layout and dtype). `deterministic` defaults to
    torch.are_deterministic_algorithms_enabled(); `partial_budget` bounds the float32 buffer of per-slot
    dQ rows (bytes; default twice the size of q). dlse float32 [Hq, T], a gradient on lse, enters as
    Delta - dlse (op.py's docstring says why). config overrides `launch_config` (the benchmark's tile
    sweeps; DQ="atomic" or "slots") and may force WIDE (tests).
    """
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    Hq, D = q.shape[1], q.shape[-1]
    Hkv = k.shape[1]
    R = routed.shape[-1]
    dq, dk, dv = (torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))
    if lay.T == 0:
        return dq, dk, dv
    block_d = max(16, triton.next_power_of_2(D))
    cfg = dict(launch_config(D, lay.block_size), **(config or {}))
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    warps = {key: cfg[key] for key in ("num_warps", "num_stages") if key in cfg}
    dims = dict(HEAD_DIM=D, BLOCK_D=block_d)
    atomic = not deterministic and cfg["DQ"] == "atomic"
    if atomic:
        sched = schedule(routed, lay, lay.NT)                  # one chunk: the accumulator holds every query
    else:
        budget = partial_budget if partial_budget is not None else default_partial_budget(q)
        sched = schedule(routed, lay, tiles_per_chunk(lay, Hq, R, block_d, 4, budget))
    pair_slot = sorted_pairs(sched) if deterministic else sched.pair_slot
    delta = torch.empty(Hq, lay.T, dtype=torch.float32, device=q.device)
    _delta_kernel[(triton.cdiv(lay.T, 32), Hq)](o, do, delta, lay.L, *strides(o), *strides(do), lay.T,
                                                BLOCK_T=32, **dims, num_warps=8)  # 32 rows: no spills up to D = 256
    if dlse is not None:
        delta -= dlse
    common = (lay.L, *strides(q), *strides(k), *strides(v), *strides(do))
    # Offsets inside one sequence are 32-bit unless a sequence spans 2**31 elements of some tensor.
    longest = lay.max_blocks * lay.block_size
    wide = cfg.get("WIDE", longest * max([strides(x)[1] for x in (q, k, v, do, dq, dk, dv)] + [block_d * max(R, 1)])
                   >= 2**31)
    # The atomic path's dQ accumulator (deterministic mode passes delta as a placeholder it never touches).
    dq_acc = torch.zeros(Hq, lay.T, 1, block_d, dtype=torch.float32, device=q.device) if atomic else delta
    tiles_per_block = triton.cdiv(lay.block_size, BN)
    _dkdv_kernel[(lay.NB * tiles_per_block, Hkv)](
        q, k, v, do, lse, delta, dk, dv, dq_acc, lay.blocks, sched.pair_offsets, pair_slot, *common,
        *strides(dk), *strides(dv), lay.T, Hq, lay.NB, Hq // Hkv, max(R, 1), sched.n_chunks if R else 0,
        scale, scale * LOG2E, BLOCK_M=BM, BLOCK_N=BN, TILES_PER_BLOCK=tiles_per_block, ATOMIC_DQ=atomic,
        WIDE=wide, **dims, **warps)
    if not atomic and R:
        tile_offsets, tile_bucket = sched.tile_table(cfg["dq_routed"]["BLOCK_M"])
    for c in range(1 if atomic else sched.n_chunks):
        token0, token1 = (0, lay.T) if atomic else sched.chunk_tokens[c:c + 2]
        tile0, tile1 = (0, lay.NT) if atomic else (c * sched.tiles_per_chunk,
                                                   min(lay.NT, (c + 1) * sched.tiles_per_chunk))
        routed_dq = dq_acc
        if not atomic:
            routed_dq = torch.zeros(Hq, token1 - token0, max(R, 1), block_d, dtype=torch.float32, device=q.device)
            if R:
                bucket_lo, bucket_hi = sched.buckets(c)
                most_tiles = -(-(token1 - token0) * Hq * R // cfg["dq_routed"]["BLOCK_M"]) + lay.NB * Hq
                _dq_routed_kernel[(most_tiles,)](
                    q, k, v, do, lse, delta, routed_dq, lay.blocks, sched.pair_offsets, pair_slot, tile_offsets,
                    tile_bucket, *common, lay.T, Hq, lay.NB, Hq // Hkv, R, c, token0, token1 - token0,
                    bucket_lo, bucket_hi, scale * LOG2E, WIDE=wide, **dims, **cfg["dq_routed"])
        _dq_kernel[(tile1 - tile0, Hq)](
            q, k, v, do, lse, delta, dq, routed_dq, lay.tiles, *common, *strides(dq),
            lay.T, Hq // Hkv, tile0, token0, token1 - token0, lay.block_size, scale, scale * LOG2E,
            SLOTS=routed_dq.shape[2], BLOCK_M=lay.QT, BLOCK_N=BN, WIDE=wide, **dims, **warps)
    return dq, dk, dv
