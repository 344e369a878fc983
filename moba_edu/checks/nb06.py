"""Checks for notebook 06 (MoBA forward in Triton): the key blocks a query-major program must load, and
the block-major buckets (CSR offsets) that the forward kernel's schedule is made of.

The right answers are computed from the routing mask and `torch.bincount`; each planted mistake is the
same computation with one slip, so a wrong answer is named by the slip it reproduces.
"""

from __future__ import annotations

import torch

from ..routing import route
from . import expect, judge, passed


def _routing_indices(S=40, D=8, block_size=8, top_k=3, seed=6):
    """indices int64 [S, min(top_k, N)] of one head: own block first, routed blocks, -1 padding."""
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 1, 1, S, D, generator=gen).unbind(0)
    return route(q, k, block_size=block_size, top_k=top_k).indices[0, 0]


def _union_sizes(indices, query_tile, columns=slice(None), count_padding=False, dedup=True):
    """Distinct blocks per tile of query_tile rows (with optional slips)."""
    cols = indices[:, columns]
    sizes = []
    for start in range(0, len(cols), query_tile):
        tile = cols[start:start + query_tile]
        real = tile[tile >= 0]
        n = real.unique().numel() if dedup else real.numel()
        sizes.append(n + int(count_padding and bool((tile < 0).any())))
    return torch.tensor(sizes)


def _same(answer, right) -> bool:
    return isinstance(answer, torch.Tensor) and answer.shape == right.shape and torch.equal(answer.long(), right.long())


def check_blocks_visited(fn) -> None:
    """fn(indices, query_tile) -> int64 [ceil(S / query_tile)]: distinct key blocks each query-major
    program loads for its tile of query_tile consecutive queries. indices int64 [S, k]: own block
    first, then routed blocks, -1 where fewer were eligible."""
    indices, query_tile = _routing_indices(), 16
    n_tiles = -(-len(indices) // query_tile)
    answer = fn(indices.clone(), query_tile)
    expect(isinstance(answer, torch.Tensor), "return a tensor: one count per query tile")
    expect(answer.numel() != n_tiles - 1, f"{answer.numel()} counts for {len(indices)} queries in tiles of "
           f"{query_tile}: the last, ragged tile (8 queries) counts too: ceil(S / query_tile) tiles")
    expect(tuple(answer.shape) == (n_tiles,), f"expected one count per tile, shape [{n_tiles}]; got "
           f"{list(answer.shape)}")
    judge(answer, _union_sizes(indices, query_tile), {
        "counted the -1 padding as a block: drop indices < 0 (queries with few eligible blocks pad with -1)":
            _union_sizes(indices, query_tile, count_padding=True),
        "summed every row's blocks without removing duplicates: a program loads a block once for all its "
        "rows (the union, e.g. torch.unique)": _union_sizes(indices, query_tile, dedup=False),
        "left out the own blocks (column 0): the program loads them too":
            _union_sizes(indices, query_tile, columns=slice(1, None)),
    }, _same, "the counts differ from the number of distinct blocks in each tile's rows")
    passed("distinct key blocks per query tile: the union of its rows' own and routed blocks")


def _offsets(routed, n_blocks, padding_to=None):
    real = routed[routed >= 0] if padding_to is None else torch.where(routed >= 0, routed, padding_to)
    counts = torch.bincount(real.flatten(), minlength=n_blocks)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def check_bucket_offsets(fn) -> None:
    """fn(routed, n_blocks) -> int64 [n_blocks + 1]: CSR offsets of the block-major buckets, so that
    offsets[j + 1] - offsets[j] queries routed to block j. routed int64 [S, R]: routed blocks (the own
    block excluded), -1 where fewer were eligible."""
    routed = _routing_indices(S=56, top_k=4)[:, 1:]
    n_blocks = 7
    right = _offsets(routed, n_blocks)
    answer = fn(routed.clone(), n_blocks)
    expect(isinstance(answer, torch.Tensor), "return a tensor of n_blocks + 1 offsets")
    answer = answer.flatten()
    counts = right.diff()
    if answer.numel() == n_blocks:
        expect(not _same(answer, counts), "returned the counts per block: the offsets are their running sum, "
               "starting at 0 (n_blocks + 1 entries)")
        expect(not _same(answer, right[1:]), "the leading 0 is missing: offsets[0] = 0, and bucket j is "
               "pair_slot[offsets[j]:offsets[j + 1]]")
    expect(answer.numel() == n_blocks + 1, f"expected n_blocks + 1 = {n_blocks + 1} offsets, got {answer.numel()}")
    judge(answer, right, {
        "the -1 padding was counted as a pair of the last block (negative indices wrap): drop routed < 0 "
        "first": _offsets(routed, n_blocks, padding_to=n_blocks - 1),
        "the -1 padding was counted as a pair of block 0 (clamped): drop routed < 0 first":
            _offsets(routed, n_blocks, padding_to=0),
    }, _same, "the offsets differ: offsets[0] = 0 and offsets[j + 1] - offsets[j] = how many entries of "
              "routed equal j")
    expect(int(answer[-1]) == int((routed >= 0).sum()), "offsets[-1] should be the number of routed pairs")
    passed("block-major bucket offsets: bucket j holds the queries that routed to key block j")
