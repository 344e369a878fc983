"""A teaching MoBA forward in Triton (notebook 06): exact MoBA, readable before fast.

One program per (query tile, query head). A query tile holds up to BLOCK_M consecutive queries of ONE
key block (tiles never cross a block boundary, as in router.py's layout), so all its rows share their
own block. The program walks
  1. its own block causally (keys up to the tile's last query, masked `key <= query`), first: every
     row then has a visible key before any fully masked tile comes, so the running max is finite;
  2. the *union* of the blocks routed by any row of the tile, each block whole, with a per-query mask:
     row t sees block j only if t routed to j (the routing, `Routing.indices`, is passed in).
Both use FlashAttention's online softmax (Dao et al., 2022; notebook 05): a running max m, sum l and
unnormalised accumulator acc per row; at the end o = acc / l and lse = m + log l (natural units).

This is FlashAttention's *query-major* schedule applied to MoBA. It is exact, but a row computes every
key of every block in its tile's union and then masks most of them: `pair_counts` counts the waste,
which is why the production kernel (moba_fwd.py) is block-major.

The two pieces a student writes are separate @triton.jit functions the kernel receives as constexpr
arguments (`ATTEND`, `WALK`; a @triton.jit function passed to a `tl.constexpr` parameter is inlined
at compile time, on the GPU as under the interpreter), so a student's version slots in unchanged:
  attend_step(q, k, v, visible, m_i, l_i, acc, qk_scale) -> (m_i, l_i, acc)   one key tile
  walk_blocks(...) -> (o, lse)                                                 the loop and the end
Everything runs in float32 (the interpreter's bfloat16 is wrong; on a GPU float32 `tl.dot` uses TF32).
A sibling, `dkdv_step`, is notebook 07's exercise: one tile of the backward's dK, dV.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..checks.grading import exercise
from . import INTERPRET


@triton.jit
def load_rows(base, rows, n_rows, stride, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows `rows` [R] of a row-major [n, HEAD_DIM] matrix at `base` (`stride` elements apart) as float32
    [R, BLOCK_D]: zero where row >= n_rows or past HEAD_DIM (masked lanes read nothing)."""
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    return tl.load(base + rows.to(tl.int64)[:, None] * stride + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)


@exercise("nb06.check_attend_step")
@triton.jit
def attend_step(q, k, v, visible, m_i, l_i, acc, qk_scale):
    """Fold one key tile into a query tile's running softmax.

    q [BM, BD], k and v [BN, BD] float32; visible bool [BM, BN] (False: key hidden from that row);
    m_i, l_i [BM] running max and sum (natural units), acc [BM, BD] unnormalised output.
    A row must have seen a visible key before (m_i finite) or see one now.
    """
    s = tl.dot(q, tl.trans(k)) * qk_scale
    s = tl.where(visible, s, -float("inf"))       # exp(-inf) = 0: hidden keys add nothing
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)                   # rescale what was summed relative to the old max
    p = tl.exp(s - m_new[:, None])
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + tl.dot(p, v)


@exercise("nb06.check_walk_blocks")
@triton.jit
def walk_blocks(q, idx, offs_m, q_end, own, k_base, v_base, stride, blocks_ptr, n_listed, block_size, qk_scale,
                ATTEND: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """The tile's walk: own block causally, then each listed routed block whole, per-query masked.

    q [BM, BD] float32 query rows at positions offs_m [BM]; idx [BM, KP] each row's blocks
    (Routing.indices, -1 padding); queries end at q_end; own the tile's block; k_base / v_base point
    at position 0 of the sequence's keys / values (rows `stride` apart); blocks_ptr the n_listed
    routed blocks of the tile (the union over its rows). Returns o [BM, BD] and lse [BM] (natural).
    """
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(own * block_size, q_end, BLOCK_N):        # 1. own block, causal
        keys = n0 + offs_n
        k = load_rows(k_base, keys, q_end, stride, HEAD_DIM, BLOCK_D)
        v = load_rows(v_base, keys, q_end, stride, HEAD_DIM, BLOCK_D)
        visible = keys[None, :] <= offs_m[:, None]
        m_i, l_i, acc = ATTEND(q, k, v, visible, m_i, l_i, acc, qk_scale)
    for u in range(n_listed):                                  # 2. routed blocks, whole
        j = tl.load(blocks_ptr + u)
        chose = tl.sum((idx == j).to(tl.int32), axis=1) > 0   # [BM]: rows that routed to block j
        end = (j + 1) * block_size
        for n0 in range(j * block_size, end, BLOCK_N):
            keys = n0 + offs_n
            k = load_rows(k_base, keys, end, stride, HEAD_DIM, BLOCK_D)
            v = load_rows(v_base, keys, end, stride, HEAD_DIM, BLOCK_D)
            visible = chose[:, None] & (keys < end)[None, :]
            m_i, l_i, acc = ATTEND(q, k, v, visible, m_i, l_i, acc, qk_scale)
    return acc / l_i[:, None], m_i + tl.log(l_i)


@triton.jit
def teaching_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, idx_ptr, blocks_ptr, counts_ptr,
                    S, Hq, GROUP, K, U, n_tiles, block_size, qk_scale,
                    tiles_per_block,
                    ATTEND: tl.constexpr, WALK: tl.constexpr, HEAD_DIM: tl.constexpr, K_PAD: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (query tiles, B * Hq). q, o [B, Hq, S, D] and k, v [B, Hkv, S, D] contiguous float32;
    lse [B, Hq, S]; idx int32 [B, Hq, S, K]; blocks int32 [B, Hq, n_tiles, U] and counts int32
    [B, Hq, n_tiles]: each tile's routed blocks (host-built union, `tile_blocks`)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)                              # b * Hq + h
    own = tile // tiles_per_block                      # the tile's block
    q_start = own * block_size + (tile % tiles_per_block) * BLOCK_M
    q_end = tl.minimum(tl.minimum(q_start + BLOCK_M, (own + 1) * block_size), S)
    if q_start >= q_end:                               # a short last block has fewer tiles
        return
    kv = (bh // Hq) * (Hq // GROUP) + (bh % Hq) // GROUP   # grouped heads: kv head h // g
    offs_m = q_start + tl.arange(0, BLOCK_M)
    row_base = bh.to(tl.int64) * S                     # row (b, h, 0) of q, o, lse and idx
    q = load_rows(q_ptr + row_base * HEAD_DIM, offs_m, q_end, HEAD_DIM, HEAD_DIM, BLOCK_D)
    slots = tl.arange(0, K_PAD)
    idx = tl.load(idx_ptr + (row_base + offs_m)[:, None] * K + slots[None, :],
                  mask=(offs_m < q_end)[:, None] & (slots < K)[None, :], other=-1)
    kv_base = kv.to(tl.int64) * S * HEAD_DIM
    list_at = bh.to(tl.int64) * n_tiles + tile
    o, lse = WALK(q, idx, offs_m, q_end, own, k_ptr + kv_base, v_ptr + kv_base, HEAD_DIM, blocks_ptr + list_at * U,
                  tl.load(counts_ptr + list_at), block_size, qk_scale, ATTEND, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_end
    tl.store(o_ptr + (row_base + offs_m)[:, None] * HEAD_DIM + offs_d[None, :], o,
             mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(lse_ptr + row_base + offs_m, lse, mask=row_ok)


def tile_blocks(indices: torch.Tensor, block_size: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query tile's routed blocks: the union over its rows of `indices[..., 1:]`.

    indices int64 [B, Hq, S, K] (Routing.indices). Tiles: `block_m` queries inside one block, numbered
    block * ceil(block_size / block_m) + sub-tile. Returns blocks int32 [B, Hq, n_tiles, U] (ascending,
    -1 padding, U >= 1) and counts int32 [B, Hq, n_tiles]."""
    B, H, S, _ = indices.shape
    N = -(-S // block_size)
    per_block = -(-block_size // block_m)
    t = torch.arange(S, device=indices.device)
    tile_of = (t // block_size) * per_block + (t % block_size) // block_m
    hit = torch.zeros(B, H, N * per_block, N + 1, dtype=torch.bool, device=indices.device)
    routed = indices[..., 1:] + 1                          # column 0: the -1 padding
    dev = indices.device
    hit.index_put_((torch.arange(B, device=dev)[:, None, None, None], torch.arange(H, device=dev)[None, :, None, None],
                    tile_of[None, None, :, None].expand_as(routed), routed),
                   torch.ones((), dtype=torch.bool, device=dev))
    hit = hit[..., 1:]
    counts = hit.sum(-1)
    order = torch.where(hit, torch.arange(N, device=dev), N).sort(-1).values
    blocks = order[..., :max(1, int(counts.max()) if counts.numel() else 1)]
    return torch.where(blocks < N, blocks, -1).to(torch.int32).contiguous(), counts.to(torch.int32).contiguous()


def launch_config() -> dict:
    """BLOCK_M, BLOCK_N: 16 under the interpreter (quick), 64 on a GPU (tl.dot needs >= 16)."""
    return dict(block_m=16, block_n=16) if INTERPRET else dict(block_m=64, block_n=64)


def moba_forward(q, k, v, indices, block_size: int, scale: float | None = None, *, attend=attend_step,
                 walk=walk_blocks, block_m: int | None = None, block_n: int | None = None):
    """MoBA attention given its routing, by the teaching kernel.

    q [B, Hq, S, D], k, v [B, Hkv, S, D] (Hq = g * Hkv), indices int64 [B, Hq, S, K] from
    `moba_edu.route(...).indices`. attend / walk: @triton.jit functions with the signatures of
    `attend_step` / `walk_blocks` (a student's versions). Returns o [B, Hq, S, D] in q's dtype and lse
    float32 [B, Hq, S]; computes in float32."""
    if q.dim() != 4 or k.shape != v.shape or k.shape[::2] != q.shape[::2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q: expected q [B, Hq, S, D] and k, v [B, Hkv, S, D] with Hq % Hkv == 0, got q "
                         f"{list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if indices.dim() != 4 or indices.shape[:3] != q.shape[:3] or indices.dtype != torch.int64:
        raise ValueError(f"indices: expected int64 [B, Hq, S, K] (Routing.indices) for q {list(q.shape)}, got "
                         f"{indices.dtype} {list(indices.shape)}")
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    config = launch_config()
    block_m, block_n = block_m or config["block_m"], block_n or config["block_n"]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q32, k32, v32 = (x.float().contiguous() for x in (q, k, v))
    o = torch.empty_like(q32)
    lse = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o.to(q.dtype), lse
    blocks, counts = tile_blocks(indices, block_size, block_m)
    K = indices.shape[-1]
    per_block = -(-block_size // block_m)
    n_tiles = blocks.shape[2]
    teaching_kernel[(n_tiles, B * Hq)](
        q32, k32, v32, o, lse, indices.to(torch.int32).contiguous(), blocks, counts,
        S, Hq, Hq // Hkv, K, blocks.shape[-1], n_tiles, block_size, scale, per_block,
        ATTEND=attend, WALK=walk, HEAD_DIM=D, K_PAD=max(2, triton.next_power_of_2(K)), BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)))
    return o.to(q.dtype), lse


def pair_counts(indices: torch.Tensor, block_size: int, block_m: int, block_n: int) -> dict:
    """(query, key) pairs MoBA needs vs pairs the teaching kernel computes (its tl.dot tiles), per part.

    indices int64 [..., S, K] (Routing.indices). Returns {"own": (needed, computed), "routed": (needed,
    computed)}. Needed: query t's own keys up to t, and block_size keys per routed block. Computed:
    BLOCK_M rows times every key tile a program visits (rows and keys it then masks included)."""
    S = indices.shape[-2]
    t = torch.arange(S, device=indices.device)
    own_needed = int((t % block_size + 1).sum()) * (indices[..., 0, 0].numel())
    routed_needed = int((indices[..., 1:] >= 0).sum()) * block_size
    blocks, counts = tile_blocks(indices.reshape(-1, 1, S, indices.shape[-1]), block_size, block_m)
    per_block = -(-block_size // block_m)
    tile = torch.arange(blocks.shape[2], device=indices.device)
    q_start = (tile // per_block) * block_size + (tile % per_block) * block_m
    q_end = torch.minimum(torch.minimum(q_start + block_m, (tile // per_block + 1) * block_size), torch.tensor(S))
    own_keys = (q_end - (tile // per_block) * block_size).clamp(min=0)
    live = q_end > q_start
    own_computed = int((-(-own_keys[live] // block_n)).sum()) * block_n * block_m * blocks.shape[0]
    routed_computed = int(counts.sum()) * (-(-block_size // block_n)) * block_n * block_m
    return {"own": (own_needed, own_computed), "routed": (routed_needed, routed_computed)}


@triton.jit
def _step_kernel(q_ptr, k_ptr, v_ptr, vis_ptr, m_ptr, l_ptr, acc_ptr, qk_scale, n_tiles,
                 ATTEND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program folds n_tiles key tiles into (m, l, acc) with ATTEND, then stores them.
    q [BM, BD]; k, v [n_tiles, BN, BD]; vis int8 [n_tiles, BM, BN]; m, l [BM]; acc [BM, BD]."""
    rows, cols, dims = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + rows[:, None] * BLOCK_D + dims[None, :])
    m_i, l_i = tl.load(m_ptr + rows), tl.load(l_ptr + rows)
    acc = tl.load(acc_ptr + rows[:, None] * BLOCK_D + dims[None, :])
    for i in range(n_tiles):
        kv = i * BLOCK_N * BLOCK_D + cols[:, None] * BLOCK_D + dims[None, :]
        visible = tl.load(vis_ptr + i * BLOCK_M * BLOCK_N + rows[:, None] * BLOCK_N + cols[None, :]) != 0
        m_i, l_i, acc = ATTEND(q, tl.load(k_ptr + kv), tl.load(v_ptr + kv), visible, m_i, l_i, acc, qk_scale)
    tl.store(m_ptr + rows, m_i)
    tl.store(l_ptr + rows, l_i)
    tl.store(acc_ptr + rows[:, None] * BLOCK_D + dims[None, :], acc)


def run_attend_step(q, k, v, visible, m, l, acc, scale, attend=attend_step):
    """Fold key tiles into a running softmax by `attend` in one program: q [BM, BD]; k, v [n, BN, BD];
    visible bool [n, BM, BN]; m, l [BM], acc [BM, BD] (float32; sizes powers of two >= 16, BD the head
    dim). Writes the new state into m, l and acc (views allowed: contiguous) and returns them."""
    _step_kernel[(1,)](q.contiguous(), k.contiguous(), v.contiguous(), visible.to(torch.int8).contiguous(),
                       m, l, acc, scale, k.shape[0], ATTEND=attend, BLOCK_M=q.shape[0], BLOCK_N=k.shape[1],
                       BLOCK_D=q.shape[1])
    return m, l, acc


@exercise("nb07.check_dkdv_step")
@triton.jit
def dkdv_step(q, do, lse, delta, k, v, visible, dk, dv, scale):
    """One query tile's share of one key tile's gradients (notebook 07): recompute P from lse, then
    dV += P^T dO and dK += scale dS^T Q with dS = P (dO V^T - Delta).

    q, do [BM, BD]; lse, delta [BM] (natural lse, Delta = rowsum(dO * O)); k, v [BN, BD];
    visible bool [BM, BN]; dk, dv [BN, BD] float32 accumulators. Returns (dk, dv)."""
    p = tl.where(visible, tl.exp(tl.dot(q, tl.trans(k)) * scale - lse[:, None]), 0.0)
    ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
    return dk + scale * tl.dot(tl.trans(ds), q), dv + tl.dot(tl.trans(p), do)


@triton.jit
def _block_grads_kernel(q_ptr, do_ptr, lse_ptr, delta_ptr, S, rows_ptr, n_rows, k_ptr, v_ptr, dk_ptr, dv_ptr,
                        key0, n_keys, scale, STEP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: dK, dV of one key block (n_keys <= BLOCK_N keys at positions key0...) from the
    n_rows query positions in rows_ptr, BLOCK_M at a time, causally masked (key <= query)."""
    keys = tl.arange(0, BLOCK_N)
    k = load_rows(k_ptr, keys, n_keys, HEAD_DIM, HEAD_DIM, BLOCK_D)
    v = load_rows(v_ptr, keys, n_keys, HEAD_DIM, HEAD_DIM, BLOCK_D)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for m0 in range(0, n_rows, BLOCK_M):
        at = m0 + tl.arange(0, BLOCK_M)
        t = tl.load(rows_ptr + at, mask=at < n_rows, other=0)   # gathered query positions
        q = load_rows(q_ptr, t, S, HEAD_DIM, HEAD_DIM, BLOCK_D)
        do = load_rows(do_ptr, t, S, HEAD_DIM, HEAD_DIM, BLOCK_D)
        lse = tl.load(lse_ptr + t)
        delta = tl.load(delta_ptr + t)
        visible = (at < n_rows)[:, None] & (keys < n_keys)[None, :] & ((key0 + keys)[None, :] <= t[:, None])
        dk, dv = STEP(q, do, lse, delta, k, v, visible, dk, dv, scale)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (keys < n_keys)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(dk_ptr + keys[:, None] * HEAD_DIM + offs_d[None, :], dk, mask=ok)
    tl.store(dv_ptr + keys[:, None] * HEAD_DIM + offs_d[None, :], dv, mask=ok)


def block_grads(q, do, lse, delta, rows, k, v, key0: int, scale: float, step=dkdv_step, dk=None, dv=None):
    """dK, dV of one key block by `step`: q, do [S, D]; lse, delta [S]; rows int [n] the query positions
    that attend the block (each sees keys <= itself); k, v [W, D] the block's keys at positions key0 ...
    key0 + W - 1. Returns dk, dv float32 [W, D] (written into dk / dv when given, e.g. guarded views)."""
    W, D = k.shape
    f32 = lambda x: x.float().contiguous()  # noqa: E731
    dk = torch.empty(W, D, dtype=torch.float32, device=k.device) if dk is None else dk
    dv = torch.empty(W, D, dtype=torch.float32, device=k.device) if dv is None else dv
    _block_grads_kernel[(1,)](f32(q), f32(do), f32(lse), f32(delta), q.shape[0], rows.to(torch.int32).contiguous(),
                              rows.numel(), f32(k), f32(v), dk, dv, key0, W, scale, STEP=step, HEAD_DIM=D, BLOCK_M=16,
                              BLOCK_N=max(16, triton.next_power_of_2(W)), BLOCK_D=max(16, triton.next_power_of_2(D)))
    return dk, dv
