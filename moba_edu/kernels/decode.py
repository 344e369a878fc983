"""MoBA decoding in Triton: route from the cached page means, attend the chosen pages split across
programs, merge the partials by log-sum-exp (flash-decoding; docs/design.md §2a).

A decoding step has one query per (sequence, head): far too few rows for the forward's query tiles,
and dense attention over a long cache is bound by reading K and V. MoBA reads much less: the float32
mean of every full page (one [D] vector per block_size keys) to route, then the keys and values of
top_k pages. Three small kernels, all reading the cache in place through the page table
(decode.py's `MobaKVCache`: pages [P, block_size, Hkv, D], means float32 [P, Hkv, D], page_table
int32 [B, pages per sequence]):

1. `_route_kernel`, one program per (sequence, query head, tile of query rows): stream the means of
   the eligible pages (blocks j < own block; all full, all in the past), compute the gates
   q . mean as float32 dot products (router.py's exact split on the tensor cores; an ieee dot under
   the interpreter) and keep each row's running top-R (router.py's `_insert`). Writes R page
   *block numbers* per query: routed int32 [B, s, Hq, R], -1 where fewer were eligible.
2. `_attend_kernel`, one program per (query row, query head, chosen block): flash-decoding's split
   (Dao et al., 2023, "Flash-Decoding for long-context inference"): instead of one program walking all
   top_k pages, top_k programs each attend one page, so a single token still fills the GPU. Each
   writes a partial (softmax-weighted average of the page's values, log-sum-exp of its scores); the own
   page is cut causally at the query's position.
3. `_merge_kernel`, one program per (query row, query head): o = sum_i exp(lse_i - lse) o_i with
   lse = log sum_i exp(lse_i), the exact softmax over the union of the pages (efficient.py's
   `merge_partials`).

Everything is computed in float32 (the interpreter's bfloat16 arithmetic is wrong: under it, bfloat16
caches are converted to float32 first). Shapes: q [B, Hq, s, D] -> o [B, Hq, s, D], lse float32
[B, Hq, s]; start, lengths int64 [B]: the query rows of sequence b are positions start[b] + i,
i < lengths[b].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .layout import LN2, LOG2E, LOG2E_K
from .router import _bf16_pieces, _exact_gates, _insert


@triton.jit
def _route_kernel(q_ptr, means_ptr, table_ptr, start_ptr, len_ptr, routed_ptr,
                  stride_qb, stride_qh, stride_qs, stride_tb, Hq, Hkv, S, R, block_size,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, ROUTED_PAD: tl.constexpr, Q_PIECES: tl.constexpr):
    """routed[b, i, h, :] = the R blocks j < own(i) of sequence b with the largest q_i . mean(page(j)),
    in no particular order, -1 where fewer are eligible."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < tl.load(len_ptr + b)
    own = (tl.load(start_ptr + b) + offs_m) // block_size
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qs
    q = tl.load(q_rows + offs_d[None, :], mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    q = q.to(tl.float32)
    if Q_PIECES > 0:
        q_pieces = _bf16_pieces(q)
    slots = tl.arange(0, ROUTED_PAD)
    top_v = tl.where(slots[None, :] < R, -float("inf"), float("inf")) + tl.zeros((BLOCK_M, ROUTED_PAD), tl.float32)
    top_i = tl.full((BLOCK_M, ROUTED_PAD), -1, tl.int32)
    n_eligible = tl.max(tl.where(row_ok, own, 0))
    hk = h // (Hq // Hkv)
    for j0 in range(0, n_eligible, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        page = tl.load(table_ptr + b * stride_tb + j, mask=j < n_eligible, other=0)
        means_t = tl.load(means_ptr + ((page.to(tl.int64) * Hkv + hk) * HEAD_DIM)[None, :] + offs_d[:, None],
                          mask=(j < n_eligible)[None, :] & (offs_d < HEAD_DIM)[:, None], other=0.0)
        if Q_PIECES > 0:
            gates = _exact_gates(q_pieces, _bf16_pieces(means_t), Q_PIECES)
        else:
            gates = tl.dot(q, means_t, input_precision="ieee")      # [BM, BN] float32, unscaled
        gates = tl.where(row_ok[:, None] & (j[None, :] < own[:, None]), gates, -float("inf"))
        top_v, top_i = _insert(gates, j0, top_v, top_i, ROUTED_PAD, BLOCK_N)
    top_i = tl.where(top_v > -float("inf"), top_i, -1)                # slots never filled
    out = routed_ptr + (((b * S + offs_m) * Hq + h).to(tl.int64) * R)[:, None] + slots[None, :]
    tl.store(out, top_i, mask=row_ok[:, None] & (slots < R)[None, :])


@triton.jit
def _attend_kernel(q_ptr, k_ptr, v_ptr, table_ptr, start_ptr, len_ptr, routed_ptr, po_ptr, plse_ptr,
                   stride_qb, stride_qh, stride_qs, stride_tb, Hq, Hkv, S, R, block_size, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Partial attention of query row (b, i), head h, over its c-th chosen block (c = 0: the own block,
    causally; c > 0: routed block c - 1): po [BLOCK_D] normalised output, plse natural log-sum-exp
    (-inf for an empty slot)."""
    row = tl.program_id(0)
    h = tl.program_id(1)
    c = tl.program_id(2)
    b = row // S
    i = row % S
    if i >= tl.load(len_ptr + b):
        return                                                         # a padding row
    t = tl.load(start_ptr + b) + i
    own = t // block_size
    pair = (row * Hq + h).to(tl.int64) * (R + 1) + c
    j = own
    if c > 0:
        j = tl.load(routed_ptr + (row * Hq + h).to(tl.int64) * R + c - 1)
    if j < 0:
        return                                                         # no such block: plse stays -inf
    n_keys = tl.where(j == own, t - own * block_size + 1, block_size)  # the own page up to t only
    page = tl.load(table_ptr + b * stride_tb + j).to(tl.int64)
    hk = h // (Hq // Hkv)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + i.to(tl.int64) * stride_qs + offs_d,
                mask=d_ok, other=0.0).to(tl.float32)
    m_i = tl.full((1,), -float("inf"), tl.float32)                     # running max and sum, log2 units
    l_i = tl.zeros((1,), tl.float32)
    acc = tl.zeros((1, BLOCK_D), tl.float32)
    for n0 in range(0, n_keys, BLOCK_N):
        key_ok = (n0 + offs_n) < n_keys
        rows = ((page * block_size + n0 + offs_n) * Hkv + hk) * HEAD_DIM   # [BLOCK_N] element offsets
        ok = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + rows[:, None] + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        s = tl.sum(q[None, :] * k, axis=1) * qk_scale                  # [BLOCK_N] scores, log2 units
        s = tl.where(key_ok, s, -float("inf"))[None, :]                # [1, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + rows[:, None] + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p.reshape(BLOCK_N, 1) * v, axis=0)[None, :]
        m_i = m_new
    tl.store(po_ptr + pair * BLOCK_D + offs_d[None, :], acc / l_i[:, None])
    tl.store(plse_ptr + pair + tl.arange(0, 1), (m_i + tl.log2(l_i)) * LN2)


@triton.jit
def _merge_kernel(po_ptr, plse_ptr, len_ptr, o_ptr, lse_ptr, Hq, S, R,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHOSEN_PAD: tl.constexpr):
    """o[b, h, i] = sum_c exp(lse_c - lse) o_c, lse = log sum_c exp(lse_c) over the R + 1 partials;
    zeros (and lse -inf) in padding rows."""
    row = tl.program_id(0)
    h = tl.program_id(1)
    b = row // S
    i = row % S
    offs_c = tl.arange(0, CHOSEN_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    valid = i < tl.load(len_ptr + b)
    pairs = (row * Hq + h).to(tl.int64) * (R + 1) + offs_c
    c_ok = offs_c < tl.where(valid, R + 1, 0)                         # none in a padding row
    part_lse = tl.load(plse_ptr + pairs, mask=c_ok, other=-float("inf"))
    m = tl.where(valid, tl.max(part_lse, axis=0), 0.0)                  # finite: the own block has keys
    w = tl.where(c_ok, tl.exp2((part_lse - m) * LOG2E_K), 0.0)             # 0 for an empty slot (lse -inf)
    part_o = tl.load(po_ptr + pairs[:, None] * BLOCK_D + offs_d[None, :], mask=(w > 0)[:, None], other=0.0)
    total = tl.where(valid, tl.sum(w, axis=0), 1.0)
    o = tl.sum(w[:, None] * part_o, axis=0) / total
    out = ((b * Hq + h) * S + i).to(tl.int64)
    tl.store(o_ptr + out * HEAD_DIM + offs_d, o.to(o_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(lse_ptr + out, tl.where(valid, m + tl.log2(total) * LN2, -float("inf")))


def _prepare(q, cache, start, lengths):
    """The kernels' operands: q and the pages in float32 under the interpreter for bfloat16 (its bf16
    arithmetic is wrong), q's last dim contiguous; start and lengths (host) as int32 on q's device."""
    k_pages, v_pages = cache.k_pages, cache.v_pages
    if INTERPRET and q.dtype == torch.bfloat16:
        q, k_pages, v_pages = q.float(), k_pages.float(), v_pages.float()
    q = q if q.stride(-1) == 1 else q.contiguous()
    # non_blocking: a host-to-device copy from pageable memory is staged at once, so it is safe, and it
    # does not wait for the GPU: a decoding step then never synchronises with it (host work overlaps)
    start_d, len_d = (x.to(torch.int32).to(q.device, non_blocking=True) for x in (start, lengths))
    return q, k_pages, v_pages, start_d, len_d


def routed_slots(cache, top_k: int, start: torch.Tensor, lengths: torch.Tensor) -> int:
    """R = min(top_k - 1, most blocks eligible to any query row): routed blocks kept per query."""
    last = (start + lengths - 1).clamp_min(0)                    # each sequence's last query position
    return max(0, min(top_k - 1, int((last // cache.block_size).max()) if len(last) else 0))


def route_pages(q, cache, top_k: int, start: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Step 1: routed int32 [B, s, Hq, R], block numbers within each sequence (-1: none; any order)."""
    B, Hq, S, D = q.shape
    R = routed_slots(cache, top_k, start, lengths)
    routed = torch.full((B, S, Hq, R), -1, dtype=torch.int32, device=q.device)
    if R == 0 or B * S == 0:
        return routed
    dtype = q.dtype
    q, _, _, start_d, len_d = _prepare(q, cache, start, lengths)
    block_m = 16                                                  # tl.dot's smallest tile
    _route_kernel[(B, Hq, triton.cdiv(S, block_m))](
        q, cache.means, cache.page_table, start_d, len_d, routed, q.stride(0), q.stride(1), q.stride(2),
        cache.page_table.stride(0), Hq, cache.num_kv_heads, S, R, cache.block_size, HEAD_DIM=D,
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=block_m, BLOCK_N=16 if INTERPRET else 64,
        ROUTED_PAD=triton.next_power_of_2(R),
        Q_PIECES=0 if INTERPRET else {torch.bfloat16: 1, torch.float16: 2}.get(dtype, 3))
    return routed


def attend_pages(q, cache, routed: torch.Tensor, scale: float, start: torch.Tensor, lengths: torch.Tensor):
    """Steps 2 and 3: o [B, Hq, s, D] (q's dtype; zeros in padding rows) and lse float32 [B, Hq, s]
    (-inf in padding rows) of each query over its own block and its routed blocks `routed`."""
    B, Hq, S, D = q.shape
    R = routed.shape[-1]
    o = torch.empty(B, Hq, S, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    if B * S == 0:
        return o, lse
    q, k_pages, v_pages, start_d, len_d = _prepare(q, cache, start, lengths)
    block_d = max(16, triton.next_power_of_2(D))
    partial_o = torch.empty(B * S, Hq, R + 1, block_d, dtype=torch.float32, device=q.device)
    partial_lse = torch.full((B * S, Hq, R + 1), float("-inf"), dtype=torch.float32, device=q.device)
    block_n = 16 if INTERPRET or cache.block_size <= 16 else 64
    _attend_kernel[(B * S, Hq, R + 1)](
        q, k_pages, v_pages, cache.page_table, start_d, len_d, routed, partial_o, partial_lse,
        q.stride(0), q.stride(1), q.stride(2), cache.page_table.stride(0), Hq, cache.num_kv_heads, S, R,
        cache.block_size, scale * LOG2E, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_N=block_n)
    _merge_kernel[(B * S, Hq)](partial_o, partial_lse, len_d, o, lse, Hq, S, R, HEAD_DIM=D, BLOCK_D=block_d,
                               CHOSEN_PAD=triton.next_power_of_2(R + 1))
    return o, lse


def decode(q, cache, top_k: int, scale: float, start: torch.Tensor, lengths: torch.Tensor):
    """q [B, Hq, s, D] over cache (decode.MobaKVCache); query rows of sequence b at positions start[b] + i,
    i < lengths[b] (int64 [B], host) -> o [B, Hq, s, D] (q's dtype), lse float32 [B, Hq, s]."""
    return attend_pages(q, cache, route_pages(q, cache, top_k, start, lengths), scale, start, lengths)
