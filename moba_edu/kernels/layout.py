"""What the router, the forward and the backward kernels share: token rows, tables, the schedule's shape.

Tokens. Every input is seen as T packed tokens without copying it: a batch [B, H, S, D] is B sequences
of S tokens, token t = b * S + s; a packed [T, H, D] is used as given (flash-attn's cu_seqlens). A
kernel finds row (t, h) of a tensor at `row_offset(t, h, L, stride_b, stride_s, stride_h)`
= (t // L) * stride_b + (t % L) * stride_s + h * stride_h, with L = S for a batch and L = T (and
stride_b unused) for packed input (`Layout.L`, `strides`).

Layout (host tables, built once per shape and cached; `layout(lengths, block_size, device)`):
  blocks  int32 [NB, 2]  per global key block (numbered in token order over all sequences):
                         (first token, length); only a sequence's last block may be short.
  tiles   int32 [NT, 4]  per query tile: (first token, position in its sequence, rows, global id of
                         its sequence's block 0). A tile holds QT = `query_tile()` consecutive queries
                         and never crosses a block boundary, so all its rows share one own block,
                         `own = pos // block_size`, and the same eligible blocks j < own.
Routing (router.py's `packed_route`):
  routed  int32 [Hq, T, R]  R = min(top_k - 1, max blocks per sequence - 1) routed blocks per query,
                         as block indices *within the query's sequence*, by descending gate, -1 where
                         fewer blocks were eligible (== routing.route(...).indices[..., 1:]).
Schedule (router.py's `schedule`), block-major: for every (query chunk c, global key block b, query
head h) a bucket `(c * NB + b) * Hq + h` lists the routed pairs (query t chose block b at rank r) of
that head and chunk. The g query heads of one key/value head are adjacent buckets, so a backward
program for (key block b, kv head hk) reads buckets [(c*NB + b)*Hq + hk*g, ... + g) for each chunk c.
  pair_offsets int32 [n_chunks * NB * Hq + 1]  CSR offsets into pair_slot.
  pair_slot    int32 [>= P]  the pairs, each as t * R + r (t = slot // R, r = slot % R). Order within
                         a bucket is arbitrary (atomics): per-query results do not depend on it.
  Chunks are ranges of `tiles_per_chunk` query tiles (contiguous tokens) so that a buffer of per-pair
  partial results (the forward's routed outputs, the deterministic backward's dQ terms) stays within
  a byte budget (`default_partial_budget`); `schedule(..., tiles_per_chunk=NT)` gives one chunk.
The forward also returns lse float32 [Hq, T] (natural log-sum-exp of each query's scaled scores).

Kernels work in log2 units: exp(x) = exp2(x * LOG2E), and a log2 turns back into a natural log by LN2.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import INTERPRET

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): exp2 is the GPU's native instruction
LOG2E_K = tl.constexpr(LOG2E)  # the same, as a constexpr global that kernels may read
LN2 = tl.constexpr(math.log(2.0))  # log2 -> natural log, inside kernels


def query_tile() -> int:
    """Queries per tile. 64 on a GPU; 16 under the interpreter, where small tiles keep tests quick."""
    return 16 if INTERPRET else 64


@triton.jit
def row_offset(t, h, L, stride_b, stride_s, stride_h):
    """Element offset of row (token t, head h), in int64 (a million tokens x 16 heads x 128 passes 2**31).
    t // L and t % L in int32 (T < 2**31, `schedule` asserts it): a 64-bit division per row is a
    software routine whose registers made the forward kernels spill (notes/gpu_forward.md)."""
    t = t.to(tl.int32)
    return (t // L).to(tl.int64) * stride_b + (t % L).to(tl.int64) * stride_s + h.to(tl.int64) * stride_h


@triton.jit
def tile_header(tiles_ptr, tile):
    """Query tile `tile`'s row of the tiles table: (first token, position in its sequence, rows, global
    id of its sequence's block 0)."""
    row = tiles_ptr + 4 * tile
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)


def strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(stride_b, stride_s, stride_h) of a [B, H, S, D] or [T, H, D] tensor, as `row_offset` reads them."""
    if x.dim() == 4:
        return x.stride(0), x.stride(2), x.stride(1)
    return 0, x.stride(0), x.stride(1)


@dataclass(frozen=True)
class Layout:
    """Sequences, key blocks and query tiles of one input shape (see the module docstring).

    T tokens; L the row divisor of `row_offset`; NB key blocks; NT query tiles of QT rows;
    max_blocks the most blocks of any sequence; blocks / tiles the device tables;
    tile_tokens (host, int64 [NT + 1]) the first token of each tile, then T.
    """

    T: int
    L: int
    block_size: int
    QT: int
    NB: int
    NT: int
    max_blocks: int
    blocks: torch.Tensor
    tiles: torch.Tensor
    tile_tokens: torch.Tensor

    def routed_slots(self, top_k: int) -> int:
        """R: routed blocks kept per query (the own block is never among the eligible ones)."""
        return max(0, min(top_k - 1, self.max_blocks - 1))


@functools.lru_cache(maxsize=64)
def layout(lengths: tuple, block_size: int, device: torch.device, batched: bool) -> Layout:
    """Tables for sequences of the given lengths (a batch: all equal, batched=True)."""
    lengths = torch.tensor(lengths, dtype=torch.int64)
    n_seq = lengths.numel()
    starts = torch.cumsum(lengths, 0) - lengths
    QT = query_tile()
    n_blocks = -(-lengths // block_size)
    first_block = torch.cumsum(n_blocks, 0) - n_blocks
    block_seq = torch.repeat_interleave(torch.arange(n_seq), n_blocks)
    block_pos = (torch.arange(block_seq.numel()) - first_block[block_seq]) * block_size
    block_token = starts[block_seq] + block_pos
    block_len = torch.minimum(lengths[block_seq] - block_pos, torch.tensor(block_size))
    n_tiles = -(-block_len // QT)
    tile_block = torch.repeat_interleave(torch.arange(block_seq.numel()), n_tiles)
    tile_k = torch.arange(tile_block.numel()) - (torch.cumsum(n_tiles, 0) - n_tiles)[tile_block]
    tiles = torch.stack([block_token[tile_block] + tile_k * QT, block_pos[tile_block] + tile_k * QT,
                         torch.minimum(block_len[tile_block] - tile_k * QT, torch.tensor(QT)),
                         first_block[block_seq[tile_block]]], dim=1)
    T = int(lengths.sum())
    return Layout(T=T, L=(int(lengths[0]) if batched and n_seq else max(T, 1)), block_size=block_size, QT=QT,
                  NB=block_seq.numel(), NT=tile_block.numel(), max_blocks=int(n_blocks.max()) if n_seq else 0,
                  blocks=torch.stack([block_token, block_len], 1).to(device, torch.int32).contiguous(),
                  tiles=tiles.to(device, torch.int32).contiguous(),
                  tile_tokens=torch.cat([tiles[:, 0], torch.tensor([T])]))


@dataclass
class Schedule:
    """Block-major lists of routed pairs (module docstring). `routed`, `pair_offsets`, `pair_slot` as
    described there; R routed slots per query; chunk c covers query tiles
    [c * tiles_per_chunk, (c + 1) * tiles_per_chunk) and tokens [chunk_tokens[c], chunk_tokens[c + 1])."""

    layout: Layout
    Hq: int
    R: int
    routed: torch.Tensor
    tiles_per_chunk: int
    n_chunks: int
    chunk_tokens: list
    pair_offsets: torch.Tensor
    pair_slot: torch.Tensor

    def buckets(self, chunk: int) -> tuple[int, int]:
        """Bucket range [lo, hi) of one chunk."""
        n = self.layout.NB * self.Hq
        return chunk * n, (chunk + 1) * n

    def tile_table(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tiles of `rows` pairs, numbered flat over all buckets: tile_offsets int32 [n_buckets + 1], where
        each bucket's tiles start, and tile_bucket int32 [>= number of tiles], the bucket of each tile
        (one load per program instead of a binary search of ~12 dependent loads over tile_offsets).
        The table's length is a bound known on the host (no device sync): every bucket has at most one
        tile beyond its pairs / rows."""
        counts = self.pair_offsets[1:] - self.pair_offsets[:-1]
        tiles = torch.cumsum((counts + rows - 1) // rows, 0, dtype=torch.int32)
        tile_offsets = torch.cat([tiles.new_zeros(1), tiles])
        most = -(-self.layout.T * self.Hq * self.R // rows) + counts.numel()
        flat = torch.arange(most, dtype=torch.int32, device=tiles.device)
        return tile_offsets, torch.searchsorted(tiles, flat, right=True, out_int32=True)


def tiles_per_chunk(lay: Layout, Hq: int, R: int, block_d: int, element_size: int, budget: int) -> int:
    """Query tiles per chunk so that the chunk's partials ([Hq, tokens, R] rows of block_d elements of
    `element_size` bytes, and a float32 lse each) fit `budget` bytes."""
    per_token = max(1, Hq * R * (block_d * element_size + 4))
    return max(1, budget // (per_token * lay.QT))


def default_partial_budget(q: torch.Tensor) -> int:
    """Bytes for a buffer of per-pair partials: twice the size of q (at least 64 MiB), so that a pass's
    extra memory stays within the size of q, k, v and o."""
    return max(2 * q.numel() * q.element_size(), 2**26)
