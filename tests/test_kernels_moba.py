"""The Triton router and MoBA forward (moba_edu/kernels/router.py, moba_fwd.py) under Triton's CPU
interpreter, against routing.py and the float64 reference. Shapes stay small: the interpreter takes
milliseconds per tile step. (On a GPU these tests run on the CPU too only if TRITON_INTERPRET=1.)"""

import pytest
import torch
from hypothesis import given, settings

import moba_edu as me
from moba_edu import kernels
from reference import assert_valid_routing, reference_moba, reference_moba_varlen
from strategies import LARGE_HEAD_DIMS, cases, rel_err, varlen_cases

pytestmark = pytest.mark.skipif(not kernels.INTERPRET, reason="runs the kernels under the CPU interpreter")

from moba_edu.kernels import layout, router  # noqa: E402  (after the interpreter switch above)
from moba_edu.kernels.moba_fwd import moba_forward  # noqa: E402

FEW = settings(max_examples=8)


def triton_routed(q, k, block_size, top_k, lengths):
    """routed int32 [Hq, T, R] of packed q [T, Hq, D], k [T, Hkv, D] by the Triton router."""
    lay = layout.layout(tuple(lengths), block_size, q.device, False)
    return router.packed_route(q, router.block_means(k, lay), lay, top_k)


def as_packed(x):
    """[B, H, S, D] -> [B * S, H, D]."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


@FEW
@given(case=cases(max_s=64, head_dims=(4, 16, 32)))
def test_router_matches_routing(case):
    q, k, _ = case.tensors(torch.float32)
    routed = triton_routed(as_packed(q), as_packed(k), case.block_size, case.top_k, [case.S] * case.B)
    routed = routed.view(case.Hq, case.B, case.S, -1).transpose(0, 1)  # [B, Hq, S, R]
    assert routed.shape[-1] == min(case.top_k, case.n_blocks) - 1
    g = case.Hq // case.Hkv
    for b in range(case.B):
        for h in range(case.Hq):
            assert_valid_routing(routed[b, h], q[b, h], k[b, h // g], case.block_size, case.top_k)


@FEW
@given(case=varlen_cases(max_len=48, head_dims=(8, 16)))
def test_router_varlen_restarts_blocks(case):
    q, k, _ = case.tensors(torch.float32)
    routed = triton_routed(q, k, case.block_size, case.top_k, case.lengths)
    bounds = case.cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        R = min(case.top_k, -(-(end - start) // case.block_size)) - 1
        g = case.Hq // case.Hkv
        for h in range(case.Hq):
            assert_valid_routing(routed[h, start:end, :R], q[start:end, h], k[start:end, h // g],
                                 case.block_size, case.top_k)
        assert (routed[:, start:end, R:] == -1).all()   # slots past this sequence's blocks


@pytest.mark.parametrize("router_counts", [False, True])
def test_schedule_lists_every_pair_once(router_counts):
    """Every routed pair in its (chunk, block, head) bucket once: with the schedule's own counting pass,
    and with the pairs counted by the router (as the forward runs it)."""
    lengths = (30, 0, 45, 1)
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(76, 4, 16, generator=gen), torch.randn(76, 2, 16, generator=gen)
    lay = layout.layout(lengths, 8, q.device, False)
    counts = router.pair_counts(lay, 4, 2, q.device) if router_counts else None
    routed = router.packed_route(q, router.block_means(k, lay), lay, 4, counts, tiles_per_chunk=2)
    sched = router.schedule(routed, lay, tiles_per_chunk=2, counts=counts)
    Hq, R = 4, sched.R
    offsets, slots = sched.pair_offsets.tolist(), sched.pair_slot.tolist()
    listed = []
    for bucket in range(len(offsets) - 1):
        chunk, block, h = bucket // Hq // lay.NB, bucket // Hq % lay.NB, bucket % Hq
        listed += [(chunk, block, h, s // R, s % R) for s in slots[offsets[bucket]:offsets[bucket + 1]]]
    expected = []
    for tile, (token0, _, rows, block0) in enumerate(lay.tiles.tolist()):
        for h in range(Hq):
            for t in range(token0, token0 + rows):
                expected += [(tile // 2, block0 + j, h, t, r) for r, j in enumerate(routed[h, t].tolist()) if j >= 0]
    assert sorted(listed) == sorted(expected)
    assert sched.chunk_tokens[0] == 0 and sched.chunk_tokens[-1] == 76


@FEW
@given(case=cases(max_s=64, head_dims=(4, 16, 32)))
def test_forward_matches_reference(case):
    q, k, v = case.tensors(torch.float32)
    o, lse = me.moba_attention(q, k, v, block_size=case.block_size, top_k=case.top_k, impl="triton",
                               return_lse=True)
    o_ref, lse_ref = reference_moba(q, k, v, case.block_size, case.top_k)
    assert o.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert rel_err(o, o_ref) < 1e-5
    torch.testing.assert_close(lse.double(), lse_ref, atol=1e-5, rtol=1e-5)


@settings(max_examples=6)
@given(case=cases(max_s=48, head_dims=LARGE_HEAD_DIMS, max_batch=1))
def test_large_head_dims_match_reference(case):
    """Head dims 160 to 256 (MAX_HEAD_DIM): the router's choices and the forward, padded head dims
    included."""
    q, k, v = case.tensors(torch.float32)
    routed = triton_routed(as_packed(q), as_packed(k), case.block_size, case.top_k, [case.S])   # [Hq, S, R]
    for h in range(case.Hq):
        assert_valid_routing(routed[h], q[0, h], k[0, h // (case.Hq // case.Hkv)], case.block_size, case.top_k)
    o, lse = me.moba_attention(q, k, v, block_size=case.block_size, top_k=case.top_k, impl="triton",
                               return_lse=True)
    o_ref, lse_ref = reference_moba(q, k, v, case.block_size, case.top_k)
    assert rel_err(o, o_ref) < 1e-5
    torch.testing.assert_close(lse.double(), lse_ref, atol=1e-5, rtol=1e-5)


@FEW
@given(case=varlen_cases(max_len=40, head_dims=(8, 16)))
def test_varlen_matches_reference(case):
    q, k, v = case.tensors(torch.float32)
    o, lse = me.moba_attention_varlen(q, k, v, case.cu_seqlens, case.max_seqlen, block_size=case.block_size,
                                      top_k=case.top_k, impl="triton", return_lse=True)
    o_ref, lse_ref = reference_moba_varlen(q, k, v, case.cu_seqlens, case.block_size, case.top_k)
    assert o.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
    assert rel_err(o, o_ref) < 1e-5
    torch.testing.assert_close(lse.double(), lse_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_low_precision(dtype, tol):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, 75, 32, generator=gen).to(dtype) for h in (4, 2, 2))
    o = me.moba_attention(q, k, v, block_size=16, top_k=3, impl="triton")
    assert o.dtype == dtype
    o_ref, _ = reference_moba(q, k, v, 16, 3)   # routes from the same low-precision inputs
    assert rel_err(o, o_ref) < tol


def test_chunks_change_nothing():
    """A partial buffer too small for one chunk (many chunks) computes the same as one chunk, up to
    float32 rounding (the chunks merge partials in another order)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(90, h, 16, generator=gen) for h in (2, 1, 1))
    lengths = (50, 0, 40)
    one = moba_forward(q, k, v, lengths, 8, 4, 0.25)
    many = moba_forward(q, k, v, lengths, 8, 4, 0.25, partial_budget=1)
    assert many[2].n_chunks == many[2].layout.NT > one[2].n_chunks == 1
    torch.testing.assert_close(many[0], one[0])
    torch.testing.assert_close(many[1], one[1])


@pytest.mark.parametrize("top_k", [1, 9])
def test_top_k_extremes(top_k):
    """top_k = 1: block-local causal attention; top_k past the number of blocks: dense causal."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 61, 16, generator=gen) for _ in range(3))
    o = me.moba_attention(q, k, v, block_size=8, top_k=top_k, impl="triton")
    o_ref, _ = reference_moba(q, k, v, 8, top_k)
    assert rel_err(o, o_ref) < 1e-5
    if top_k > 8:
        dense = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
        assert rel_err(o, dense) < 1e-5


def test_non_contiguous_views():
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(2, 29, 3, 4, 16, generator=gen)   # [B, S, 3, H, D], a fused projection's layout
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    o = me.moba_attention(q, k, v, block_size=5, top_k=3, impl="triton")
    o_ref, _ = reference_moba(q, k, v, 5, 3)
    assert rel_err(o, o_ref) < 1e-5


def test_unsupported_inputs_name_the_argument():
    q = torch.randn(1, 2, 8, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="q"):
        me.moba_attention(q, q, q, block_size=4, top_k=2, impl="triton")
    q = torch.randn(1, 2, 8, kernels.MAX_HEAD_DIM + 1)
    assert kernels.MAX_HEAD_DIM == 256
    with pytest.raises(ValueError, match="q: impl='triton' takes head dims 1 to 256, got 257"):
        me.moba_attention(q, q, q, block_size=4, top_k=2, impl="triton")
    assert kernels.unsupported(q[..., :256], q[..., :256], q[..., :256]) is None


def test_empty_inputs():
    q = torch.randn(2, 2, 0, 16)
    assert me.moba_attention(q, q, q, block_size=4, top_k=2, impl="triton").shape == q.shape
    q = torch.randn(0, 2, 16)
    o, lse = me.moba_attention_varlen(q, q, q, torch.tensor([0, 0], dtype=torch.int32), 0, block_size=4, top_k=2,
                                      impl="triton", return_lse=True)
    assert o.shape == q.shape and lse.shape == (2, 0)


def test_autocast():
    """Under torch.autocast the kernels run in the autocast dtype (bfloat16 here: computed in float32
    by the interpreter), as SDPA does."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 33, 16, generator=gen) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = me.moba_attention(q, k, v, block_size=8, top_k=2, impl="triton")
    assert o.dtype == torch.bfloat16
    o_ref, _ = reference_moba(q.bfloat16(), k.bfloat16(), v.bfloat16(), 8, 2)
    assert rel_err(o, o_ref) < 1.6e-2
