"""The MoBA router in Triton, and the schedule the forward and backward kernels share.

Semantics are routing.py's (docs/design.md §1): block means in float32 over real tokens, gates
q_t . mean_k(j) as float32 dot products (never TF32), block j eligible for query t only if
j < t // block_size, the own block always attended and not counted among the `top_k - 1` routed
ones, query head h reading key head h // g, blocks restarting at every sequence.

How the float32 gates are computed. Under the interpreter: `tl.dot(..., input_precision="ieee")`.
On a GPU that FMA dot ran 10-17x over the router's floor on the H200 (notes/gpu_forward.md), so the
gates run on the tensor cores *exactly*: each float32 mean is split into three bfloat16 pieces whose
sum is the mean exactly (once per call, `means_pieces`), q (bfloat16) is one piece (float16: two,
float32: three), every product of two bfloat16 pieces is exact in float32 and the tensor cores
accumulate in float32. Only the accumulation rounds, as in the FMA dot; TF32 instead rounds both
operands to 11 bits (`_exact_gates`). docs/design.md §1 names the ieee dot; this computes the same float32 dot product.

Tables (layout.py): the token rows, `Layout` (key blocks and query tiles), the routing this file
writes (`routed` int32 [Hq, T, R]) and the block-major `Schedule` it builds for the forward and
backward kernels (moba_fwd.py, moba_bwd.py).

Kernels
=======
`_block_means_kernel`: one program per (key block, kv head) sums the block's keys in float32.
`_route_kernel` (launched by `packed_route`): one program per (query tile, query head) streams over
the eligible blocks' means BN at a time, computes the [QT, BN] float32 gates (above), and keeps each
row's running top-R in registers (values and indices [QT, RP]): a candidate is inserted only if it
beats the row's current R-th best, so after the first few block tiles insertions are rare and the loop
costs little beside the dot. No [S, N] gate matrix is ever written: the router reads q once and
writes R int32 per query.
`_pairs_kernel`: counts the pairs per bucket (first launch; the forward has the router count them
instead, one pass over the routing fewer), then, after a prefix sum, scatters each pair to its bucket
through an atomic cursor (second launch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .layout import Layout, Schedule, row_offset, strides, tile_header


@triton.jit
def _block_means_kernel(k_ptr, means_ptr, blocks_ptr, L, stride_kb, stride_ks, stride_kh, NB,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """means[hk, b, :] = float32 mean of block b's keys of kv head hk (zeros past HEAD_DIM)."""
    b = tl.program_id(0)
    hk = tl.program_id(1)
    token0 = tl.load(blocks_ptr + 2 * b)
    length = tl.load(blocks_ptr + 2 * b + 1)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    base = k_ptr + row_offset(token0, hk, L, stride_kb, stride_ks, stride_kh)
    total = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for t0 in range(0, length, BLOCK_T):   # a block never crosses a sequence: rows are stride_ks apart
        ok = ((t0 + offs_t) < length)[:, None] & (offs_d < HEAD_DIM)[None, :]
        total += tl.load(base + (t0 + offs_t)[:, None] * stride_ks + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(total, axis=0) / length.to(tl.float32)
    tl.store(means_ptr + (hk * NB + b).to(tl.int64) * BLOCK_D + offs_d, mean)


def block_means(k: torch.Tensor, lay: Layout) -> torch.Tensor:
    """k [B, Hkv, S, D] or [T, Hkv, D] -> means float32 [Hkv, NB, BLOCK_D] (head dim zero-padded to a
    power of two >= 16, so that the router's loads need no mask)."""
    Hkv, D = k.shape[1], k.shape[-1]     # the head axis is axis 1 in both layouts
    block_d = max(16, triton.next_power_of_2(D))
    means = torch.empty(Hkv, lay.NB, block_d, dtype=torch.float32, device=k.device)
    if lay.NB:
        _block_means_kernel[(lay.NB, Hkv)](k, means, lay.blocks, lay.L, *strides(k), lay.NB,
                                           HEAD_DIM=D, BLOCK_D=block_d, BLOCK_T=16 if INTERPRET else 32)
    return means


@triton.jit
def _insert(gates, j0, top_v, top_i, ROUTED_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """Fold a [BM, BLOCK_N] tile of gates (blocks j0 .. j0 + BLOCK_N - 1; -inf where not eligible) into
    each row's running top list top_v / top_i [BM, ROUTED_PAD] (+inf marks slots past R, never replaced).

    Each pass moves every row's best remaining candidate into the slot of its current worst entry; a
    candidate must beat that worst entry (strictly: on a tie the earlier block stays, as a stable sort
    would keep it). Passes stop when no row has a candidate left, at most R passes per tile and usually
    none once a row has seen a few tiles.
    """
    slots = tl.arange(0, ROUTED_PAD)
    cols = tl.arange(0, BLOCK_N)
    worst = tl.min(top_v, axis=1)
    best_v, best_c = tl.max(gates, axis=1, return_indices=True)
    # (Written so that only tensors of the dot's layout are carried: a masked copy of the gates or a
    # boolean mask carried through the loop made Triton 3.9 put the loop's state in local memory.)
    while tl.max((best_v > worst).to(tl.int32)) > 0:
        put = (slots[None, :] == tl.argmin(top_v, axis=1)[:, None]) & (best_v > worst)[:, None]
        top_v = tl.where(put, best_v[:, None], top_v)
        top_i = tl.where(put, (j0 + best_c)[:, None], top_i)
        gates = tl.where(cols[None, :] == best_c[:, None], -float("inf"), gates)  # taken (or hopeless)
        worst = tl.min(top_v, axis=1)
        best_v, best_c = tl.max(gates, axis=1, return_indices=True)
    return top_v, top_i


@triton.jit
def _bf16_pieces(x):
    """x float32 -> (hi, mid, lo) bfloat16 with hi + mid + lo == x exactly: each piece takes the next
    8 significant bits (x - hi is exact in float32, and so is the next remainder)."""
    hi = x.to(tl.bfloat16)
    rest = x - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    return hi, mid, (rest - mid.to(tl.float32)).to(tl.bfloat16)


def means_pieces(means: torch.Tensor) -> torch.Tensor:
    """float32 means [Hkv, NB, BD] -> bfloat16 [3, Hkv, NB, BD], the (hi, mid, lo) of `_bf16_pieces`
    (both round to nearest even), split once per call instead of once per router program and tile."""
    hi = means.to(torch.bfloat16)
    rest = means - hi.float()
    mid = rest.to(torch.bfloat16)
    return torch.stack([hi, mid, (rest - mid.float()).to(torch.bfloat16)])


@triton.jit
def _exact_gates(q_pieces, m_pieces, Q_PIECES: tl.constexpr):
    """[BM, BN] float32 gates q . mean on the tensor cores, as a float32 dot product: the means
    [BD, BN] come as three bfloat16 pieces (`_bf16_pieces`), q as Q_PIECES (1 for bfloat16, 2 for
    float16, 3 for float32 inputs), every product of bfloat16 pieces is exact in float32 and the tensor
    cores accumulate in float32, so only the accumulation rounds, as in an FMA dot (and unlike TF32,
    which rounds the operands to 11 bits). Smallest terms first."""
    q_hi, q_mid, q_lo = q_pieces
    m_hi, m_mid, m_lo = m_pieces
    gates = tl.dot(q_hi, m_lo, tl.zeros((q_hi.shape[0], m_hi.shape[1]), tl.float32))
    if Q_PIECES >= 3:
        gates = tl.dot(q_lo, m_lo, gates)
        gates = tl.dot(q_lo, m_mid, gates)
        gates = tl.dot(q_lo, m_hi, gates)
    if Q_PIECES >= 2:
        gates = tl.dot(q_mid, m_lo, gates)
        gates = tl.dot(q_mid, m_mid, gates)
        gates = tl.dot(q_mid, m_hi, gates)
    gates = tl.dot(q_hi, m_mid, gates)
    return tl.dot(q_hi, m_hi, gates)


@triton.jit
def _route_kernel(q_ptr, means_ptr, routed_ptr, tiles_ptr, counts_ptr, L, stride_qb, stride_qs, stride_qh,
                  T, NB, GROUP, block_size, R, tiles_per_chunk, PIECE,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, ROUTED_PAD: tl.constexpr, Q_PIECES: tl.constexpr, COUNT: tl.constexpr):
    """Q_PIECES > 0: gates by `_exact_gates` (GPU) from the means' bfloat16 pieces (`means_pieces`, PIECE
    elements apart); 0: by an ieee float32 `tl.dot` of the float32 means (the interpreter, whose
    bfloat16 arithmetic is wrong, triton #11584). COUNT: also count each pair into its bucket of
    the schedule (chunks of tiles_per_chunk query tiles), `_pairs_kernel`'s first pass done here."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    token0, pos0, rows, block0 = tile_header(tiles_ptr, tile)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < rows
    t = token0 + offs_m
    q_ptrs = q_ptr + row_offset(t, h, L, stride_qb, stride_qs, stride_qh)[:, None] + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0).to(tl.float32)
    if Q_PIECES > 0:
        q_pieces = _bf16_pieces(q)
    own = pos0 // block_size                     # the whole tile lies in one block: blocks j < own eligible
    slots = tl.arange(0, ROUTED_PAD)
    top_v = tl.where(slots[None, :] < R, -float("inf"), float("inf")) + tl.zeros((BLOCK_M, ROUTED_PAD), tl.float32)
    top_i = tl.full((BLOCK_M, ROUTED_PAD), -1, tl.int32)
    means_base = means_ptr + ((h // GROUP) * NB + block0).to(tl.int64) * BLOCK_D
    for j0 in range(0, own, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        means_t = means_base + j[None, :] * BLOCK_D + offs_d[:, None]    # [BD, BN] addresses
        eligible = (j < own)[None, :]
        if Q_PIECES > 0:
            m_pieces = (tl.load(means_t, mask=eligible, other=0.0), tl.load(means_t + PIECE, mask=eligible, other=0.0),
                        tl.load(means_t + 2 * PIECE, mask=eligible, other=0.0))
            gates = _exact_gates(q_pieces, m_pieces, Q_PIECES)
        else:
            gates = tl.dot(q, tl.load(means_t, mask=eligible, other=0.0), input_precision="ieee")   # [BM, BN] float32
        gates = tl.where(row_ok[:, None] & eligible, gates, -float("inf"))
        top_v, top_i = _insert(gates, j0, top_v, top_i, ROUTED_PAD, BLOCK_N)
    # Emit by descending gate: R passes of "take the row's best remaining slot".
    top_v = tl.where(slots[None, :] < R, top_v, -float("inf"))
    out_ptrs = routed_ptr + (h * T + t).to(tl.int64) * R
    for r in range(R):
        best = tl.argmax(top_v, axis=1)
        hit = slots[None, :] == best[:, None]
        j = tl.sum(tl.where(hit, top_i, 0), axis=1)
        tl.store(out_ptrs + r, j, mask=row_ok)  # -1 if never filled
        if COUNT:
            bucket = ((tile // tiles_per_chunk) * NB + block0 + j) * tl.num_programs(1) + h
            tl.atomic_add(counts_ptr + bucket, 1, mask=row_ok & (j >= 0), sem="relaxed")
        top_v = tl.where(hit, -float("inf"), top_v)
        top_i = tl.where(hit, -1, top_i)


def launch_config(head_dim: int) -> dict:
    """The router's block tile and warps. 4 warps and tiles of 64 blocks: the fastest of six shapes on
    the H200 at 128K and 512K tokens (figures/bench/h200/moba_fwd_tiles-router-*.json; 8 warps ran
    2-2.4x slower), two or more programs per SM hiding each other's load latency. Past 128 (BLOCK_D =
    256) tiles of 32 blocks (208 registers, 80 KB shared, no spill; 64 blocks spill 240 B). Under the
    interpreter, 16 blocks."""
    if INTERPRET:
        return dict(BLOCK_N=16)
    return dict(BLOCK_N=64 if head_dim <= 128 else 32, num_warps=4, num_stages=2)


def packed_route(q: torch.Tensor, means: torch.Tensor, lay: Layout, top_k: int, counts: torch.Tensor | None = None,
                 tiles_per_chunk: int = 1, config: dict | None = None) -> torch.Tensor:
    """q [B, Hq, S, D] or [T, Hq, D], means from `block_means` -> routed int32 [Hq, T, R] (layout.py).

    The kernel-side router, on packed tokens; the public `moba_edu.route` is its inspection twin.
    counts int32 [n_chunks * NB * Hq] (zeros), if given: the router also counts each pair into its
    schedule bucket for chunks of `tiles_per_chunk` query tiles (`schedule(..., counts=counts)`).
    config overrides `launch_config` (the benchmark's tile sweep)."""
    Hq, D = q.shape[1], q.shape[-1]
    R = lay.routed_slots(top_k)
    routed = torch.empty(Hq, lay.T, R, dtype=torch.int32, device=q.device)
    if R == 0 or lay.NT == 0:
        return routed
    block_d = means.shape[-1]
    q_pieces = 0 if INTERPRET else {torch.bfloat16: 1, torch.float16: 2}.get(q.dtype, 3)
    _route_kernel[(lay.NT, Hq)](q, means_pieces(means) if q_pieces else means, routed, lay.tiles,
                                routed if counts is None else counts, lay.L, *strides(q), lay.T, lay.NB,
                                Hq // means.shape[0], lay.block_size, R, tiles_per_chunk, means.numel(),
                                HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=lay.QT, ROUTED_PAD=triton.next_power_of_2(R),
                                Q_PIECES=q_pieces, COUNT=counts is not None, **(config or launch_config(D)))
    return routed


@triton.jit
def _pairs_kernel(routed_ptr, tiles_ptr, counts_ptr, slot_ptr, T, NB, Hq, R, tiles_per_chunk,
                  FILL: tl.constexpr, BLOCK_M: tl.constexpr, ROUTED_PAD: tl.constexpr):
    """Per (query tile, head): count each routed pair into its bucket, or (FILL) scatter it there."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    token0, _, rows, block0 = tile_header(tiles_ptr, tile)
    t = token0 + tl.arange(0, BLOCK_M)
    r = tl.arange(0, ROUTED_PAD)
    ok = (tl.arange(0, BLOCK_M) < rows)[:, None] & (r < R)[None, :]
    j = tl.load(routed_ptr + ((h * T + t).to(tl.int64) * R)[:, None] + r[None, :], mask=ok, other=-1)
    ok = j >= 0
    bucket = ((tile // tiles_per_chunk) * NB + block0 + j) * Hq + h
    if FILL:
        at = tl.atomic_add(counts_ptr + bucket, 1, mask=ok, sem="relaxed")   # counts_ptr: the cursors
        tl.store(slot_ptr + at, t[:, None] * R + r[None, :], mask=ok)
    else:
        tl.atomic_add(counts_ptr + bucket, 1, mask=ok, sem="relaxed")


def pair_counts(lay: Layout, Hq: int, tiles_per_chunk: int, device) -> torch.Tensor:
    """Zeroed int32 [n_chunks * NB * Hq]: one pair count per schedule bucket, for chunks of
    `tiles_per_chunk` query tiles (filled by the router, `packed_route(..., counts=...)`, or by
    `schedule`'s own counting pass)."""
    return torch.zeros(max(1, -(-lay.NT // tiles_per_chunk)) * lay.NB * Hq, dtype=torch.int32, device=device)


def schedule(routed: torch.Tensor, lay: Layout, tiles_per_chunk: int, counts: torch.Tensor | None = None) -> Schedule:
    """Build the block-major pair lists of `routed` int32 [Hq, T, R] (layout.py's docstring). counts:
    the pairs per bucket, where the router counted them (`packed_route(..., counts=...)`, the same
    tiles_per_chunk); else a counting pass runs first."""
    Hq, T, R = routed.shape
    counted = counts is not None
    if not counted:
        counts = pair_counts(lay, Hq, tiles_per_chunk, routed.device)
    n_chunks = max(1, -(-lay.NT // tiles_per_chunk))
    assert T * Hq * R < 2**31 and counts.numel() < 2**31, "pair numbering is int32"
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=routed.device)
    pair_slot = torch.empty(T * Hq * R, dtype=torch.int32, device=routed.device)
    if R and lay.NT:
        args = (routed, lay.tiles)
        common = dict(BLOCK_M=lay.QT, ROUTED_PAD=triton.next_power_of_2(R))
        if not counted:
            _pairs_kernel[(lay.NT, Hq)](*args, counts, pair_slot, T, lay.NB, Hq, R, tiles_per_chunk, FILL=False,
                                        **common)
        torch.cumsum(counts, 0, dtype=torch.int32, out=offsets[1:])
        cursor = offsets[:-1].clone()
        _pairs_kernel[(lay.NT, Hq)](*args, cursor, pair_slot, T, lay.NB, Hq, R, tiles_per_chunk, FILL=True, **common)
    chunk_tiles = [min(c * tiles_per_chunk, lay.NT) for c in range(n_chunks + 1)]
    return Schedule(layout=lay, Hq=Hq, R=R, routed=routed, tiles_per_chunk=tiles_per_chunk, n_chunks=n_chunks,
                    chunk_tokens=[int(lay.tile_tokens[i]) for i in chunk_tiles],
                    pair_offsets=offsets, pair_slot=pair_slot)
