"""The torch rung (moba_edu/efficient.py) beyond the shared property tests of test_rungs.py: its pieces
(chunked router, log-sum-exp merge, block table), agreement with the naive rung on the notebooks'
examples, a longer sequence against the reference, and memory that does not grow like S^2."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moba_edu as me
from moba_edu import api, efficient
from reference import assert_valid_routing, reference_moba
from strategies import cases, rel_err


@given(case=cases(max_s=64), budget=st.integers(1, 200))
def test_chunked_router_routes_exactly_like_route(case, budget):
    q, k, _ = case.tensors(torch.float32)
    chunked = me.route_indices(q, k, block_size=case.block_size, top_k=case.top_k, gate_budget=budget)
    assert chunked.shape == me.route(q, k, block_size=case.block_size, top_k=case.top_k).indices.shape
    own = torch.arange(case.S) // case.block_size
    assert (chunked[..., 0] == own).all()
    g = case.Hq // case.Hkv
    for b in range(case.B):
        for h in range(case.Hq):
            assert_valid_routing(chunked[b, h, :, 1:], q[b, h], k[b, h // g], case.block_size, case.top_k)


def test_router_chunks_when_the_gate_matrix_is_large():
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 512, 8, generator=gen) for _ in range(2))
    for budget in (64, 1000, 2 * 32 * 100, None):  # 1, 15 and 100 rows per chunk; all at once
        chunked = me.route_indices(q, k, block_size=16, top_k=4, **({} if budget is None else {"gate_budget": budget}))
        for h in range(2):
            assert_valid_routing(chunked[0, h, :, 1:], q[0, h], k[0, h], 16, 4)


@given(n_sets=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_merge_of_partials_over_disjoint_key_sets_is_the_softmax(n_sets, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(20, 8, generator=gen, dtype=torch.float64) * 3 for _ in range(2))
    owner = torch.randint(0, n_sets, (20,), generator=gen)  # which set each key belongs to; some may be empty
    partials = []
    for i in range(n_sets):
        if (owner == i).any():
            partials.append(efficient.partial_attention(q, k[owner == i], v[owner == i], 0.5))
        else:
            partials.append((torch.zeros(3, 8, dtype=torch.float64), torch.full((3,), float("-inf"), dtype=torch.float64)))
    o, lse = efficient.merge_partials(torch.stack([p[0] for p in partials], dim=1),
                                      torch.stack([p[1] for p in partials], dim=1))
    scores = q @ k.T * 0.5
    torch.testing.assert_close(o, scores.softmax(-1) @ v)
    torch.testing.assert_close(lse, scores.logsumexp(-1))


def test_merge_survives_scores_that_would_overflow_exp():
    o = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    lse = torch.tensor([[1000.0, 1000.0 + math.log(3.0)]], dtype=torch.float64)  # exp overflows; weights 1/4, 3/4
    merged, total = efficient.merge_partials(o, lse)
    torch.testing.assert_close(merged, torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    assert torch.isfinite(total).all()


def test_block_table_restarts_at_each_sequence():
    cu = torch.tensor([0, 5, 5, 6, 13])  # lengths 5, 0, 1, 7
    table = efficient.BlockTable.build(cu, longest=7, block_size=3)
    assert table.first.tolist() == [0, 2, 2, 3]
    assert table.tokens.tolist() == [[0, 1, 2], [3, 4, 3], [5, 5, 5], [6, 7, 8], [9, 10, 11], [12, 12, 12]]
    assert table.valid.sum(1).tolist() == [3, 2, 1, 3, 3, 1]


# The examples of notebook 04 (sections 1-4, 3, 5 and the timing of 8), where it compares the rungs.
NOTEBOOK_EXAMPLES = [
    dict(B=1, Hq=1, Hkv=1, S=64, D=16, block_size=8, top_k=3),
    dict(B=1, Hq=1, Hkv=1, S=64, D=16, block_size=8, top_k=1),
    dict(B=1, Hq=4, Hkv=2, S=100, D=16, block_size=16, top_k=3),
    dict(B=1, Hq=4, Hkv=4, S=2048, D=64, block_size=256, top_k=3),
]


@pytest.mark.parametrize("ex", NOTEBOOK_EXAMPLES, ids=lambda ex: f"S{ex['S']}-bs{ex['block_size']}-k{ex['top_k']}")
def test_torch_rung_agrees_with_naive_rung(ex):
    gen = torch.Generator().manual_seed(ex["S"])
    small = ex["S"] <= 256  # gradients too, where the naive rung's autograd graph is small
    q = torch.randn(ex["B"], ex["Hq"], ex["S"], ex["D"], generator=gen, requires_grad=small)
    k, v = (torch.randn(ex["B"], ex["Hkv"], ex["S"], ex["D"], generator=gen, requires_grad=small) for _ in range(2))
    args = dict(block_size=ex["block_size"], top_k=ex["top_k"], return_lse=True)
    (o_t, lse_t), (o_n, lse_n) = (me.moba_attention(q, k, v, impl=impl, **args) for impl in ("torch", "naive"))
    torch.testing.assert_close(o_t, o_n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_t, lse_n, atol=1e-5, rtol=1e-5)
    if small:
        do = torch.randn(o_t.shape, generator=gen)
        for g_t, g_n in zip(torch.autograd.grad(o_t, (q, k, v), do), torch.autograd.grad(o_n, (q, k, v), do)):
            assert rel_err(g_t, g_n) < 1e-5


def test_torch_rung_agrees_with_naive_rung_on_the_packed_example():
    cu = torch.tensor([0, 5, 5, 6, 13], dtype=torch.int32)  # notebook 04, section 6: lengths 5, 0, 1, 7
    q, k, v = torch.randn(3, 13, 2, 8, generator=torch.Generator().manual_seed(2)).unbind(0)
    (o_t, lse_t), (o_n, lse_n) = (
        me.moba_attention_varlen(q, k, v, cu, 7, block_size=3, top_k=2, impl=impl, return_lse=True)
        for impl in ("torch", "naive"))
    torch.testing.assert_close(o_t, o_n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_t, lse_n, atol=1e-5, rtol=1e-5)


def test_longer_sequence_matches_reference():
    """S = 2048: many tiles per (block, head), groups far larger than one tile, grouped heads."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 2048, 8, generator=gen)
    k, v = (torch.randn(1, 2, 2048, 8, generator=gen) for _ in range(2))
    o, lse = me.moba_attention(q, k, v, block_size=32, top_k=5, impl="torch", return_lse=True)
    o_ref, lse_ref = reference_moba(q, k, v, 32, 5)
    torch.testing.assert_close(o.double(), o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), lse_ref, atol=1e-5, rtol=1e-5)


def test_no_allocation_grows_like_s_squared():
    S = 8192
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 1, S, 4, generator=gen) for _ in range(3))
    with torch.profiler.profile(profile_memory=True) as prof:
        me.moba_attention(q, k, v, block_size=64, top_k=2, impl="torch")
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert largest <= S * S * 4 / 16, f"an allocation of {largest / 2**20:.1f} MiB; [S, S] is {S * S * 4 / 2**20:.0f} MiB"


def test_auto_picks_the_torch_rung_on_cpu():
    q = torch.randn(1, 1, 4, 4)
    assert api._pick_rung("auto", q, q, q) is efficient
