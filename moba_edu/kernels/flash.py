"""Dense causal FlashAttention forward in Triton: the stepping stone to the MoBA kernel (notebook 05).

FlashAttention (Dao et al., 2022; FlashAttention-2, Dao, 2023) never writes the [S, S] score matrix.
One program owns a tile of BLOCK_M queries, keeps them in registers, and walks the key/value tiles of
its past BLOCK_N at a time. For each key tile it computes the scores, folds them into a running
softmax (the online softmax of primer.py, one running max m and sum l per query row), and adds the
tile's contribution to an unnormalised output accumulator, rescaled whenever the running max grows.
At the end the accumulator is divided by l, and the log-sum-exp m + log(l) is saved: the backward
pass recomputes the probabilities from it instead of storing them.

Causality splits the walk in two stages. Key tiles wholly before the query tile need no mask; only
the tiles on the diagonal (keys in the query tile's own range) need the causal mask `key <= query`,
so the common case pays nothing for masking.

Shapes: q [B, H, S, D], k and v [B, Hkv, S, D] with H = g * Hkv (query head h reads key/value head
h // g: grouped-query attention), o [B, H, S, D], lse float32 [B, H, S].
"""

import math

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .layout import LN2, LOG2E  # exp(x) = exp2(x * LOG2E): exp2 is the GPU's native instruction


@triton.jit
def attend_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, offs_m, offs_n, offs_d, S, qk_scale,
                HEAD_DIM: tl.constexpr, DIAGONAL: tl.constexpr):
    """Fold one key/value tile into the running softmax of a query tile.

    acc [BLOCK_M, BLOCK_D] float32 unnormalised output, m_i / l_i [BLOCK_M] running max and sum, both
    in log2 units; q [BLOCK_M, BLOCK_D]; k_ptrs, v_ptrs [BLOCK_N, BLOCK_D] addresses of the tile;
    offs_m / offs_n the query / key positions, S the sequence length. DIAGONAL applies the causal mask
    (key <= query) and guards keys past the end of the sequence; other tiles need neither.
    """
    d_ok = offs_d[None, :] < HEAD_DIM        # all true when BLOCK_D == HEAD_DIM: compiled away
    if DIAGONAL:
        kv_ok = d_ok & (offs_n[:, None] < S)   # the last key tile may be ragged: don't read past it
    else:
        kv_ok = d_ok
    k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
    s = tl.dot(q, tl.trans(k)) * qk_scale     # [BLOCK_M, BLOCK_N] scores, in log2 units
    if DIAGONAL:
        # Causal: key <= query. This also hides the padding keys >= S from every real query.
        s = tl.where(offs_m[:, None] >= offs_n[None, :], s, -float("inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)               # how much the old max overestimated: rescale by it
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)        # probabilities rounded to the input dtype, as FA-2
    return acc, m_new, l_i


@triton.jit
def flash_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
                     stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                     stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
                     H, GROUP, S, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)                   # which query tile
    pid_bh = tl.program_id(1)                  # which (batch, head)
    # Head offsets in int64: at a million tokens h * stride_qh passes 2**31.
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kv_h = h // GROUP                          # grouped-query attention: g query heads share one kv head
    q_start = pid_m * BLOCK_M

    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m[:, None] < S               # the last query tile may be ragged
    d_ok = offs_d[None, :] < HEAD_DIM
    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok & d_ok, other=0.0)   # loaded once, reused for every key tile
    k_ptrs = k_ptr + b * stride_kb + kv_h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = v_ptr + b * stride_vb + kv_h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :]

    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    # Stage 1: key tiles wholly before the query tile: every key is visible, no mask.
    for start_n in range(0, q_start, BLOCK_N):
        acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, offs_m, start_n + offs_n, offs_d,
                                    S, qk_scale, HEAD_DIM, DIAGONAL=False)
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    # Stage 2: the diagonal: keys in the query tile's own range, causally masked. Its first key tile
    # holds key q_start, visible to every row, so m_i is finite before any fully masked tile comes.
    for start_n in range(q_start, tl.minimum(q_start + BLOCK_M, S), BLOCK_N):
        acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, offs_m, start_n + offs_n, offs_d,
                                    S, qk_scale, HEAD_DIM, DIAGONAL=True)
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs

    o = acc / l_i[:, None]
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=row_ok & d_ok)
    lse = (m_i + tl.log2(l_i)) * LN2      # back from log2 to natural units
    tl.store(lse_ptr + pid_bh.to(tl.int64) * S + offs_m, lse, mask=offs_m < S)


def launch_config(head_dim: int) -> dict:
    """Tile sizes, warps and pipeline stages. The interpreter runs one program at a time, so small
    tiles keep it quick. On a GPU, FlashAttention-2's 128 x 64 tiles feed the tensor cores; past head
    dim 128 the float32 accumulator [BLOCK_M, D] would crowd the registers, so the query tile halves."""
    if INTERPRET:
        return dict(block_m=32, block_n=16)
    return dict(block_m=128 if head_dim <= 128 else 64, block_n=64,
                num_warps=4 if head_dim <= 64 else 8, num_stages=3 if head_dim <= 128 else 2)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                    block_m: int | None = None, block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal attention by the FlashAttention forward.

    q: [B, H, S, D], k and v: [B, Hkv, S, D] with H % Hkv == 0 (any strides; the last dim is made
    contiguous). scale defaults to 1/sqrt(D). block_m must be a multiple of block_n (both powers of
    two, >= 16 on a GPU). Returns o [B, H, S, D] in q's dtype and lse float32 [B, H, S], the natural
    log-sum-exp of each query's scaled scores over keys <= itself. float32 inputs use TF32 in `tl.dot`
    on a GPU; bfloat16 under the interpreter is computed in float32 (its bf16 arithmetic is wrong).
    """
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    assert H % Hkv == 0 and k.shape == v.shape == (B, Hkv, S, D), "q [B,H,S,D], k/v [B,Hkv,S,D], H % Hkv == 0"
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out_dtype = q.dtype
    if INTERPRET and q.dtype == torch.bfloat16:
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    config = launch_config(D)
    block_m = block_m or config["block_m"]
    block_n = block_n or config["block_n"]
    assert block_m % block_n == 0, "the diagonal stage starts at a query tile boundary: block_m % block_n == 0"

    o = torch.empty(B, H, S, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o.to(out_dtype), lse
    grid = (triton.cdiv(S, block_m), B * H)
    flash_fwd_kernel[grid](
        q, k, v, o, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        H, H // Hkv, S, scale * LOG2E,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)),
        num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3))
    return o.to(out_dtype), lse
