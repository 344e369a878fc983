"""Checks for notebook 06 (MoBA forward in Triton): the key blocks a query-major program must load, the
two Triton pieces of the teaching kernel (`attend_step`, `walk_blocks`: moba_edu/kernels/teaching.py),
and the block-major buckets (CSR offsets) of the production schedule.

The right answers are computed in PyTorch (float64 dense masks from the routing, `torch.bincount`);
each planted mistake is the same computation with one slip, so a wrong answer is named by the slip it
reproduces. Triton pieces run through `sandbox.run` (on the GPU if there is one, else the interpreter):
a failure inside Triton, or a load out of bounds, is one line too.
"""

from __future__ import annotations

import torch

import math

from ..routing import indices_to_mask, route
from . import expect, judge, passed, sandbox
from .nb05 import _update


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


def _tol() -> float:
    """Relative tolerance of a float32 kernel result: TF32 dots on a GPU, exact float32 in the interpreter."""
    from ..kernels import INTERPRET

    return 1e-4 if INTERPRET else 5e-3


def _grid(gen, *shape):
    """Random multiples of 1/8 in [-2, 2]: exact in TF32 and bfloat16, so that a GPU's TF32 `tl.dot` of
    them is exact and only the float32 accumulation rounds (scores stay exact even near 500)."""
    return torch.randint(-16, 17, shape, generator=gen).float() / 8


def _close(answer, right) -> bool:
    return all(a.shape == r.shape and bool(torch.isfinite(a).all()) and
               float((a.double() - r.double()).norm()) <= _tol() * max(1.0, float(r.double().norm()))
               for a, r in zip(answer, right))


def check_attend_step(attend_step) -> None:
    """attend_step(q, k, v, visible, m_i, l_i, acc, qk_scale) -> (m_i, l_i, acc): a @triton.jit function
    folding one key tile into a query tile's running softmax (q [BM, BD], k, v [BN, BD], visible bool
    [BM, BN], m_i, l_i [BM], acc [BM, BD], all float32; natural units)."""
    from ..kernels import teaching

    dev, M, D, scale = sandbox.device(), 16, 16, 0.3
    gen = torch.Generator().manual_seed(61)
    q, k, v = _grid(gen, M, D), _grid(gen, 1, M, D), _grid(gen, 1, M, D)
    visible = torch.rand(1, M, M, generator=gen) < 0.6
    visible[0, :2] = False                                   # two rows see no key of this tile
    m = torch.randn(M, generator=gen) + torch.tensor([-3.0, 3.0]).repeat(M // 2)   # some rows raise m
    l, acc = torch.rand(M, generator=gen) + 1, torch.randn(M, D, generator=gen)
    state = [x.to(dev, copy=True) for x in (m, l, acc)]
    sandbox.run(lambda: teaching.run_attend_step(*(x.to(dev) for x in (q, k, v, visible)), *state, scale, attend_step),
                {}, "attend_step")
    answer = [x.cpu() for x in state]
    s = scale * q @ k[0].T
    hide = lambda scores, fill=-math.inf: scores.masked_fill(~visible[0], fill)  # noqa: E731
    judge(answer, _update(m, l, acc, hide(s), v[0]), {
        "forgot qk_scale: s = tl.dot(q, tl.trans(k)) * qk_scale": _update(m, l, acc, hide(s / scale), v[0]),
        "hidden keys got score 0, not -inf: tl.where(visible, s, -float('inf')), so that exp gives 0":
            _update(m, l, acc, hide(s, 0.0), v[0]),
        "forgot to rescale l by alpha = exp(m_i - m_new)": _update(m, l, acc, hide(s), v[0], rescale_l=False),
        "forgot to rescale acc by alpha = exp(m_i - m_new)": _update(m, l, acc, hide(s), v[0], rescale_acc=False),
        "rescaled by exp(m_new - m_i): alpha = exp(m_i - m_new), at most 1": _update(m, l, acc, hide(s), v[0], flip=True),
        "p used the old max: p = exp(s - m_new[:, None])": _update(m, l, acc, hide(s), v[0], p_from_old_max=True),
        "returned the old max: return m_new": _update(m, l, acc, hide(s), v[0], keep_old_max=True),
        "divided acc by l inside the step: keep acc unnormalised (walk_blocks divides once at the end)":
            _update(m, l, acc, hide(s), v[0], normalise=True),
    }, _close, "(m_i, l_i, acc) after one tile differ from the online-softmax step: s = q k^T * qk_scale, -inf "
       "where hidden, m_new = max(m_i, rowmax(s)), alpha = exp(m_i - m_new), p = exp(s - m_new)")

    n, big = 3, 8.0                                          # scores in the hundreds: a plain exp overflows
    k, v = _grid(gen, n, M, D), _grid(gen, n, M, D)
    visible = torch.rand(n, M, M, generator=gen) < 0.5
    visible[0, :, 0] = True                                  # every row sees a key in the first tile
    state = [torch.full((M,), -math.inf, device=dev), torch.zeros(M, device=dev), torch.zeros(M, D, device=dev)]
    sandbox.run(lambda: teaching.run_attend_step(*(x.to(dev) for x in (q, k, v, visible)), *state, big, attend_step),
                {}, "attend_step")
    m, l, acc = (x.cpu() for x in state)
    s = (big * torch.einsum("md,tnd->mtn", q, k)).reshape(M, -1).masked_fill(~visible.transpose(0, 1).reshape(M, -1),
                                                                              -math.inf)
    expect(bool(torch.isfinite(m).all() & torch.isfinite(l).all() & torch.isfinite(acc).all()),
           "NaN or inf over several tiles from m_i = -inf: compute alpha = exp(m_i - m_new) (0 at the first tile) "
           "and p = exp(s - m_new), never exp(s) alone")
    expect(_close([acc / l[:, None], m + torch.log(l)], [s.softmax(-1) @ v.reshape(-1, D), s.logsumexp(-1)]),
           "right for one tile but not over several: acc / l should be softmax(s) @ v and m + log(l) its lse")
    passed("attend_step: the online-softmax step in Triton, per-query masked, stable over several tiles")


def _dense(q, k, v, indices, block_size, block_m, slip=None):
    """MoBA in float64 from the routing, with one slip or none: q [B, Hq, S, D] -> o, lse, row max.

    Slips: "open own" (own block seen up to the query tile's end), "tile union" (every row of a tile
    sees every block any row routed to), "no routed" (own block only)."""
    B, Hq, S, D = q.shape
    g = Hq // k.shape[1]
    t = torch.arange(S)
    key_block, own = t // block_size, t // block_size
    same_block = own[:, None] == key_block[None, :]
    tile_end = torch.minimum(torch.minimum(own * block_size + ((t % block_size) // block_m + 1) * block_m,
                                           (own + 1) * block_size), torch.tensor(S))
    own_keys = same_block & ((t[None, :] < tile_end[:, None]) if slip == "open own" else (t[None, :] <= t[:, None]))
    blocks = indices_to_mask(indices.cpu(), -(-S // block_size))              # [B, Hq, S, N]
    if slip == "tile union":
        tile = own * -(-block_size // block_m) + (t % block_size) // block_m
        same_tile = tile[:, None] == tile[None, :]
        blocks = (same_tile[None, None, :, :, None] & blocks[:, :, None, :, :]).any(3)
    routed = blocks[..., key_block] & ~same_block
    visible = own_keys | (routed if slip != "no routed" else False)
    kk, vv = (x.double().repeat_interleave(g, 1) for x in (k, v))
    scores = (q.double() @ kk.transpose(-1, -2) / math.sqrt(D)).masked_fill(~visible, -math.inf)
    lse = scores.logsumexp(-1)
    return torch.exp(scores - lse[..., None]) @ vv, lse, scores.amax(-1)


def check_walk_blocks(walk_blocks) -> None:
    """walk_blocks(q, idx, offs_m, q_end, own, k_base, v_base, stride, blocks_ptr, n_listed, block_size,
    qk_scale, ATTEND, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D) -> (o, lse): a @triton.jit function, the
    teaching kernel's walk over a query tile's blocks (see kernels/teaching.py)."""
    from ..kernels import teaching

    dev, block_m, block_n = sandbox.device(), 16, 16
    hints = {"load": "a tile was read past the end of k / v: load rows with load_rows(base, keys, end, ...), "
             "end = the block's end (q_end for the own block)"}
    for (B, Hq, Hkv, S, D, block_size, top_k) in [(1, 2, 1, 40, 16, 12, 3), (1, 1, 1, 64, 8, 32, 2)]:
        gen = torch.Generator().manual_seed(S)
        q, k, v = (_grid(gen, B, h, S, D) for h in (Hq, Hkv, Hkv))
        indices = route(q, k, block_size=block_size, top_k=top_k).indices
        run = lambda: teaching.moba_forward(*(x.to(dev) for x in (q, k, v, indices)), block_size,  # noqa: E731
                                            walk=walk_blocks, block_m=block_m, block_n=block_n)
        answer = []
        sandbox.run(lambda: answer.extend(x.cpu() for x in run()), hints, "walk_blocks")
        o, lse = answer
        o_right, lse_right, m = _dense(q, k, v, indices, block_size, block_m)
        expect(bool(torch.isfinite(o).all()), "NaN or inf in o: does every row attend its own block first (causally, "
               "keys <= query), so that l > 0 before routed tiles where it sees nothing?")
        phantom = indices[..., 1:].ge(0).sum(-1) * (-(-block_size // block_n) * block_n - block_size)
        lse_phantom = torch.logaddexp(lse_right, phantom.double().log())
        judge([o, lse], [o_right, lse_right], {
            "the own block was attended whole: mask it causally, visible = keys <= query (offs_m)":
                _dense(q, k, v, indices, block_size, block_m, "open own")[:2],
            "every row saw every block of its tile's list: mask routed keys per query, visible = chose[:, None] "
            "with chose = the rows whose idx holds block j":
                _dense(q, k, v, indices, block_size, block_m, "tile union")[:2],
            "no routed block was attended: after the own block, walk the n_listed blocks at blocks_ptr":
                _dense(q, k, v, indices, block_size, block_m, "no routed")[:2],
            "o was not normalised: return acc / l_i[:, None]": [o_right * torch.exp(lse_right - m)[..., None], lse_right],
            "lse is only the running max: lse = m_i + tl.log(l_i)": [o_right, m],
            "lse lacks the running max: lse = m_i + tl.log(l_i)": [o_right, lse_right - m],
            "keys past a routed block's end were counted (they load as zeros, score 0): visible needs "
            "keys < (j + 1) * block_size": [o_right * torch.exp(lse_right - lse_phantom)[..., None], lse_phantom],
        }, _close, "o or lse differ from MoBA: own block causally, then each listed block j whole for the rows "
           "that chose it; o = acc / l, lse = m + log(l)")
    passed("walk_blocks: own block causally, routed blocks per query, normalised once: exact MoBA")
