"""Hidden tests for notebook 06 (MoBA forward in Triton): blocks per query tile, bucket offsets."""

from __future__ import annotations

import torch

from ...routing import route
from . import agree, equal, generator, randint


def _indices(gen):
    """A random routing of one head: indices int64 [S, k], block_size and the number of blocks."""
    S, block_size = randint(gen, 10, 60), randint(gen, 2, 8)
    q, k = torch.randn(2, 1, 1, S, 4, generator=gen)
    indices = route(q, k, block_size=block_size, top_k=randint(gen, 1, 4)).indices[0, 0]
    return indices, -(-S // block_size)


def check_blocks_visited(fn) -> None:
    gen = generator("nb06.check_blocks_visited")
    for _ in range(3):
        indices, _ = _indices(gen)
        query_tile = 2 ** randint(gen, 2, 6)
        tiles = indices.split(query_tile)
        right = torch.tensor([tile[tile >= 0].unique().numel() for tile in tiles])
        agree(fn(indices.clone(), query_tile), right, equal, f"S={len(indices)}, query_tile={query_tile}")


def check_bucket_offsets(fn) -> None:
    gen = generator("nb06.check_bucket_offsets")
    for _ in range(3):
        indices, n_blocks = _indices(gen)
        routed = indices[:, 1:]
        counts = torch.bincount(routed[routed >= 0], minlength=n_blocks)
        right = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        agree(fn(routed.clone(), n_blocks), right, lambda a, b: equal(a.flatten(), b),
              f"routed [{len(routed)}, {routed.shape[1]}], n_blocks={n_blocks}")
