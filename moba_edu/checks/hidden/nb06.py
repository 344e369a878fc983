"""Hidden tests for notebook 06 (MoBA forward in Triton): blocks per query tile, bucket offsets, the
teaching kernel's online-softmax step and block walk."""

from __future__ import annotations

import math

import torch

from ...routing import route
from .. import sandbox
from ..nb05 import _update
from ..nb06 import _close, _dense, _grid
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


def check_attend_step(attend_step) -> None:
    from ...kernels import teaching  # here, as in the visible checks: importing the checks needs no Triton

    gen = generator("nb06.check_attend_step")
    dev, M, D = sandbox.device(), 16 * randint(gen, 1, 2), 16 * randint(gen, 1, 2)
    for start_empty in (False, True):                        # a running state, or no key seen yet
        n, scale = randint(gen, 1, 3), 0.1 + torch.rand(1, generator=gen).item() * (8 if start_empty else 1)
        q, k, v = _grid(gen, M, D), _grid(gen, n, M, D), _grid(gen, n, M, D)
        visible = torch.rand(n, M, M, generator=gen) < torch.rand(1, generator=gen).item()
        if start_empty:
            visible[0, :, 0] = True                          # the first tile shows every row a key
            m, l, acc = torch.full((M,), -math.inf), torch.zeros(M), torch.zeros(M, D)
        else:
            m, l, acc = 3 * torch.randn(M, generator=gen), torch.rand(M, generator=gen) + 1, torch.randn(M, D, generator=gen)
        state = [x.to(dev, copy=True) for x in (m, l, acc)]
        sandbox.run(lambda: teaching.run_attend_step(*(x.to(dev) for x in (q, k, v, visible)), *state, scale,
                                                     attend_step), {}, "attend_step")
        right = (m, l, acc)
        for i in range(n):
            right = _update(*right, (scale * q @ k[i].T).masked_fill(~visible[i], -math.inf), v[i])
        agree([x.cpu() for x in state], right, _close,
              f"{n} key tiles of [{M}, {D}], qk_scale={scale:.3g}, " + ("no key seen before" if start_empty else "a running state"))


def check_walk_blocks(walk_blocks) -> None:
    from ...kernels import teaching

    gen = generator("nb06.check_walk_blocks")
    Hkv, g, S, D = randint(gen, 1, 2), randint(gen, 1, 2), randint(gen, 17, 48), 2 ** randint(gen, 2, 4)
    block_size, top_k = randint(gen, 3, 20), randint(gen, 1, 4)
    q, k, v = (_grid(gen, 1, h, S, D) for h in (Hkv * g, Hkv, Hkv))
    indices = route(q, k, block_size=block_size, top_k=top_k).indices
    dev, answer = sandbox.device(), []
    sandbox.run(lambda: answer.extend(x.cpu() for x in teaching.moba_forward(
        *(x.to(dev) for x in (q, k, v, indices)), block_size, walk=walk_blocks, block_m=16, block_n=16)), {},
        "walk_blocks")
    agree(answer, _dense(q, k, v, indices, block_size, 16)[:2], _close,
          f"S={S}, D={D}, {Hkv * g} query heads on {Hkv} kv heads, block_size={block_size}, top_k={top_k}")
