"""The exercise checks of notebook 06 accept the right answer and name each planted mistake."""

import pytest
import torch

from moba_edu.checks import Mistake, nb06


def blocks_visited(indices, query_tile, slip=None):
    sizes = []
    for start in range(0, len(indices), query_tile):
        tile = indices[start:start + query_tile]
        if slip == "own":
            tile = tile[:, 1:]
        if slip == "padding":
            sizes.append(tile.unique().numel())
        elif slip == "duplicates":
            sizes.append(int((tile >= 0).sum()))
        else:
            sizes.append(tile[tile >= 0].unique().numel())
    return torch.tensor(sizes[:-1] if slip == "ragged" else sizes)


def bucket_offsets(routed, n_blocks, slip=None):
    real = routed.flatten() % n_blocks if slip == "wrap" else routed[routed >= 0]
    counts = torch.bincount(real, minlength=n_blocks)
    if slip == "counts":
        return counts
    if slip == "inclusive":
        return counts.cumsum(0)
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])


def test_blocks_visited_accepts_the_right_answer(capsys):
    nb06.check_blocks_visited(blocks_visited)
    assert capsys.readouterr().out.startswith("✓")


@pytest.mark.parametrize("slip, message", [
    ("padding", "counted the -1 padding"), ("duplicates", "without removing duplicates"),
    ("own", "left out the own blocks"), ("ragged", "the last, ragged tile"),
])
def test_blocks_visited_names_the_mistake(slip, message):
    with pytest.raises(Mistake, match=message):
        nb06.check_blocks_visited(lambda indices, tile: blocks_visited(indices, tile, slip))


def test_bucket_offsets_accepts_the_right_answer(capsys):
    nb06.check_bucket_offsets(bucket_offsets)
    assert capsys.readouterr().out.startswith("✓")


@pytest.mark.parametrize("slip, message", [
    ("wrap", "padding was counted as a pair of the last block"), ("counts", "returned the counts"),
    ("inclusive", "leading 0 is missing"),
])
def test_bucket_offsets_names_the_mistake(slip, message):
    with pytest.raises(Mistake, match=message):
        nb06.check_bucket_offsets(lambda routed, n: bucket_offsets(routed, n, slip))


# --- the Triton pieces of the teaching kernel: the library's versions pass, planted slips are named ---

from moba_edu.kernels import INTERPRET  # noqa: E402,F401 (sets TRITON_INTERPRET=1 without CUDA first)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from moba_edu.kernels import teaching  # noqa: E402
from moba_edu.kernels.teaching import load_rows  # noqa: E402


@triton.jit
def attend_zero_fill(q, k, v, visible, m_i, l_i, acc, qk_scale):
    s = tl.where(visible, tl.dot(q, tl.trans(k)) * qk_scale, 0.0)          # slip: 0, not -inf
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + tl.dot(p, v)


@triton.jit
def attend_no_rescale(q, k, v, visible, m_i, l_i, acc, qk_scale):
    s = tl.where(visible, tl.dot(q, tl.trans(k)) * qk_scale, -float("inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    return m_new, l_i + tl.sum(p, axis=1), acc * alpha[:, None] + tl.dot(p, v)   # slip: l not rescaled


@triton.jit
def attend_unscaled(q, k, v, visible, m_i, l_i, acc, qk_scale):
    s = tl.where(visible, tl.dot(q, tl.trans(k)), -float("inf"))            # slip: no qk_scale
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + tl.dot(p, v)


@triton.jit
def attend_two_values(q, k, v, visible, m_i, l_i, acc, qk_scale):
    s = tl.where(visible, tl.dot(q, tl.trans(k)) * qk_scale, -float("inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    return m_new, l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)   # slip: no acc


@triton.jit
def walk_slipped(q, idx, offs_m, q_end, own, k_base, v_base, stride, blocks_ptr, n_listed, block_size, qk_scale,
                 ATTEND: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, SLIP: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(own * block_size, q_end, BLOCK_N):
        keys = n0 + offs_n
        k = load_rows(k_base, keys, q_end, stride, HEAD_DIM, BLOCK_D)
        v = load_rows(v_base, keys, q_end, stride, HEAD_DIM, BLOCK_D)
        if SLIP == "open own":
            visible = (keys < q_end)[None, :] & (offs_m >= 0)[:, None]
        else:
            visible = keys[None, :] <= offs_m[:, None]
        m_i, l_i, acc = ATTEND(q, k, v, visible, m_i, l_i, acc, qk_scale)
    for u in range(n_listed):
        j = tl.load(blocks_ptr + u)
        chose = tl.sum((idx == j).to(tl.int32), axis=1) > 0
        end = (j + 1) * block_size
        for n0 in range(j * block_size, end, BLOCK_N):
            keys = n0 + offs_n
            if SLIP == "far load":
                k = tl.load(k_base + (keys + 100_000)[:, None] * stride + tl.arange(0, BLOCK_D)[None, :])
            else:
                k = load_rows(k_base, keys, end, stride, HEAD_DIM, BLOCK_D)
            v = load_rows(v_base, keys, end, stride, HEAD_DIM, BLOCK_D)
            if SLIP == "tile union":
                visible = (keys < end)[None, :] & (offs_m >= 0)[:, None]
            elif SLIP == "phantom":
                visible = chose[:, None] & (keys >= 0)[None, :]
            else:
                visible = chose[:, None] & (keys < end)[None, :]
            m_i, l_i, acc = ATTEND(q, k, v, visible, m_i, l_i, acc, qk_scale)
    if SLIP == "unnormalised":
        return acc, m_i + tl.log(l_i)
    return acc / l_i[:, None], m_i + tl.log(l_i)


@triton.jit
def walk_open_own(q, idx, offs_m, q_end, own, k_base, v_base, stride, blocks_ptr, n_listed, block_size, qk_scale,
             ATTEND: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr):
    return walk_slipped(q, idx, offs_m, q_end, own, k_base, v_base, stride, blocks_ptr, n_listed, block_size,
                        qk_scale, ATTEND, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, "open own")


@triton.jit
def walk_tile_union(q, idx, offs_m, q_end, own, k_base, v_base, stride, blocks_ptr, n_listed, block_size, qk_scale,
             ATTEND: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr):
    return walk_slipped(q, idx, offs_m, q_end, own, k_base, v_base, stride, blocks_ptr, n_listed, block_size,
                        qk_scale, ATTEND, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, "tile union")


@triton.jit
def walk_unnormalised(q, idx, offs_m, q_end, own, k_base, v_base, stride, blocks_ptr, n_listed, block_size, qk_scale,
             ATTEND: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr):
    return walk_slipped(q, idx, offs_m, q_end, own, k_base, v_base, stride, blocks_ptr, n_listed, block_size,
                        qk_scale, ATTEND, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, "unnormalised")


@triton.jit
def walk_phantom(q, idx, offs_m, q_end, own, k_base, v_base, stride, blocks_ptr, n_listed, block_size, qk_scale,
             ATTEND: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr):
    return walk_slipped(q, idx, offs_m, q_end, own, k_base, v_base, stride, blocks_ptr, n_listed, block_size,
                        qk_scale, ATTEND, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, "phantom")


@triton.jit
def walk_far_load(q, idx, offs_m, q_end, own, k_base, v_base, stride, blocks_ptr, n_listed, block_size, qk_scale,
             ATTEND: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr):
    return walk_slipped(q, idx, offs_m, q_end, own, k_base, v_base, stride, blocks_ptr, n_listed, block_size,
                        qk_scale, ATTEND, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, "far load")


WALKS = {"open own": walk_open_own, "tile union": walk_tile_union, "unnormalised": walk_unnormalised, "phantom": walk_phantom, "far load": walk_far_load}


def test_attend_step_accepts_the_library_step(capsys):
    nb06.check_attend_step(teaching.attend_step)
    assert capsys.readouterr().out.startswith("✓")


@pytest.mark.parametrize("fn, message", [
    (attend_zero_fill, "hidden keys got score 0"), (attend_no_rescale, "forgot to rescale l"),
    (attend_unscaled, "forgot qk_scale"), (attend_two_values, "attend_step failed inside Triton"),
])
def test_attend_step_names_the_mistake(fn, message):
    with pytest.raises(Mistake, match=message):
        nb06.check_attend_step(fn)


def test_walk_blocks_accepts_the_library_walk(capsys):
    nb06.check_walk_blocks(teaching.walk_blocks)
    assert capsys.readouterr().out.startswith("✓")


@pytest.mark.parametrize("slip, message", [
    ("open own", "own block was attended whole"), ("tile union", "every row saw every block"),
    ("unnormalised", "o was not normalised"), ("phantom", "keys past a routed block's end"),
    pytest.param("far load", "read past the end of k", marks=pytest.mark.skipif(
        not INTERPRET, reason="a load this far is an illegal address on a GPU")),
])
def test_walk_blocks_names_the_mistake(slip, message):
    with pytest.raises(Mistake, match=message):
        nb06.check_walk_blocks(WALKS[slip])
