"""The router (`moba_edu.route`) against the spec and the independent reference."""

import pytest
import torch
from hypothesis import given

import moba_edu as me
from reference import assert_valid_mask
from strategies import cases


@given(case=cases())
def test_route_matches_reference(case):
    q, k, _ = case.tensors(torch.float32)
    r = me.route(q, k, block_size=case.block_size, top_k=case.top_k)
    B, Hq, S, N = case.B, case.Hq, case.S, case.n_blocks
    assert r.indices.shape == (B, Hq, S, min(case.top_k, N)) and r.indices.dtype == torch.int64
    assert r.mask.shape == r.scores.shape == r.gates.shape == (B, Hq, S, N)
    assert r.scores.dtype == r.gates.dtype == torch.float32 and r.mask.dtype == torch.bool
    g = Hq // case.Hkv
    for b in range(B):
        for h in range(Hq):
            assert_valid_mask(r.mask[b, h], q[b, h], k[b, h // g], case.block_size, case.top_k)


@given(case=cases())
def test_indices_layout(case):
    q, k, _ = case.tensors(torch.float32)
    r = me.route(q, k, block_size=case.block_size, top_k=case.top_k)
    t = torch.arange(case.S)
    own = t // case.block_size
    assert torch.equal(r.indices[..., 0], own.expand_as(r.indices[..., 0]))  # own block first
    routed = r.indices[..., 1:]
    valid = routed >= 0
    # the -1 padding comes last, and the count of routed blocks is min(top_k - 1, own)
    assert torch.equal(valid.sum(-1), torch.clamp(own, max=case.top_k - 1).expand_as(r.indices[..., 0]))
    assert (valid[..., :-1] | ~valid[..., 1:]).all()
    # routed blocks are eligible and sorted by descending gate
    gate_of = r.gates.gather(-1, routed.clamp_min(0))
    assert (gate_of[valid] > float("-inf")).all()
    assert ((gate_of[..., :-1] >= gate_of[..., 1:]) | ~valid[..., 1:]).all()
    # mask and indices say the same thing
    assert torch.equal(r.mask.sum(-1), 1 + valid.sum(-1))


@given(case=cases())
def test_gates_are_unscaled_float32_dots_with_block_means(case):
    q, k, _ = case.tensors(torch.float16)
    r = me.route(q, k, block_size=case.block_size, top_k=case.top_k)
    g = case.Hq // case.Hkv
    j = case.n_blocks - 1  # the last block, possibly short: the mean over its real tokens
    mean = k[:, :, j * case.block_size:].float().mean(2).repeat_interleave(g, 1)
    torch.testing.assert_close(r.scores[..., j], (q.float() * mean[:, :, None]).sum(-1), atol=1e-5, rtol=1e-5)
    eligible = torch.arange(case.n_blocks)[None, :] < (torch.arange(case.S) // case.block_size)[:, None]
    assert torch.equal(torch.isinf(r.gates), ~eligible.expand_as(r.gates))


def test_routing_ignores_input_dtype_of_equal_values():
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 64, 16, generator=gen).half() for _ in range(2))
    r16 = me.route(q, k, block_size=8, top_k=3)
    r32 = me.route(q.float(), k.float(), block_size=8, top_k=3)
    assert torch.equal(r16.indices, r32.indices) and torch.equal(r16.scores, r32.scores)


def test_needle_is_found():
    # a late query that matches one early block's keys routes there
    S, D, bs = 64, 16, 8
    q = torch.randn(1, 1, S, D) * 0.01
    k = torch.randn(1, 1, S, D) * 0.01
    k[0, 0, 16:24] += torch.ones(D)  # block 2 carries the needle direction
    q[0, 0, 60] = torch.ones(D)
    r = me.route(q, k, block_size=bs, top_k=2)
    assert r.indices[0, 0, 60].tolist() == [7, 2]


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_one_nan_key_poisons_every_later_query(impl):
    """The documented sharp edge: a NaN key makes its block's mean and scores NaN, top-k ranks NaN first,
    so every query for which the block is eligible routes to it, and every query from the bad key on
    (its own block's, causally) gets a NaN output."""
    gen = torch.Generator().manual_seed(2)
    S, block_size, bad = 64, 8, 13
    q, k, v = (torch.randn(1, 2, S, 8, generator=gen) for _ in range(3))
    k[0, 1, bad, 3] = float("nan")
    r = me.route(q, k, block_size=block_size, top_k=3)
    later = torch.arange(S) // block_size > bad // block_size
    assert (r.indices[0, 1, later, 1] == bad // block_size).all()    # the poisoned block, first for all
    assert r.scores[0, 1, :, bad // block_size].isnan().all() and not r.scores[0, 0].isnan().any()
    o = me.moba_attention(q, k, v, block_size=block_size, top_k=3, impl=impl)
    assert torch.equal(o[0, 1].isnan().any(-1), torch.arange(S) >= bad)
    assert not o[0, 0].isnan().any()                                  # the other head routes on its own keys
