"""The Triton backward (moba_edu/kernels/moba_bwd.py) and the differentiable op (kernels/op.py) under
Triton's CPU interpreter: gradients of impl="triton" against autograd through the float64 reference,
over the property space of the other rungs (odd lengths, tails, top_k 1 and past N, grouped heads,
packed batches with empty and length-1 sequences), plus what the op promises (lse gradients,
no_grad, partial requires_grad, deterministic mode, torch.compile, what it saves). Shapes stay small:
the interpreter takes milliseconds per tile step."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import moba_edu as me
from moba_edu import kernels
from reference import dense_causal, reference_moba, reference_moba_varlen
from strategies import LARGE_HEAD_DIMS, Case, cases, rel_err, varlen_cases

pytestmark = pytest.mark.skipif(not kernels.INTERPRET, reason="runs the kernels under the CPU interpreter")

from moba_edu.kernels import layout, router  # noqa: E402  (after the interpreter switch above)
from moba_edu.kernels.moba_bwd import moba_backward, sorted_pairs  # noqa: E402
from moba_edu.kernels.moba_fwd import moba_forward  # noqa: E402

FEW = settings(max_examples=8)


def close(g, g_ref, tol):
    """||g - g_ref|| <= tol * max(||g_ref||, 1): relative, but absolute where the exact gradient is ~0
    (dQ of a query that sees one key is exactly 0; float rounding leaves ~1e-8)."""
    return (g.double() - g_ref).norm().item() <= tol * max(g_ref.norm().item(), 1.0)


def grads(fn, q, k, v, do):
    """(dq, dk, dv) of sum(fn(q, k, v) * do), from fresh leaves of q, k, v's values."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    return torch.autograd.grad(fn(*leaves), leaves, do)


def check_batched(case: Case, dtype=torch.float32, tol=1e-4):
    q, k, v = case.tensors(dtype)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(case.seed + 1)).to(dtype)
    got = grads(lambda q, k, v: me.moba_attention(q, k, v, block_size=case.block_size, top_k=case.top_k,
                                                  impl="triton"), q, k, v, do)
    want = grads(lambda q, k, v: reference_moba(q, k, v, case.block_size, case.top_k)[0],
                 q.double(), k.double(), v.double(), do.double())
    for name, g, g_ref in zip("qkv", got, want):
        assert g.dtype == dtype and g.shape == g_ref.shape and g.isfinite().all(), f"d{name}"
        assert close(g, g_ref, tol), f"d{name}: {rel_err(g, g_ref):.3g}"


@FEW
@given(case=cases(max_s=40, head_dims=(8, 16)))
def test_gradients_match_reference(case):
    check_batched(case)


@settings(max_examples=6)
@given(case=cases(max_s=40, head_dims=LARGE_HEAD_DIMS, max_batch=1))
def test_large_head_dim_gradients_match_reference(case):
    check_batched(case)


def test_large_head_dim_deterministic_chunks_match_reference():
    """Deterministic mode at a padded head dim (200 -> 256): the per-slot dQ partials are BLOCK_D wide,
    chunked one query tile at a time, on a packed batch with grouped heads."""
    gen = torch.Generator().manual_seed(15)
    cu = torch.tensor([0, 21, 21, 40])
    q, k, v, do = (torch.randn(40, h, 200, generator=gen) for h in (2, 1, 1, 2))
    torch.use_deterministic_algorithms(True)
    try:
        got = backward_of(q, k, v, do, (21, 0, 19), 8, 3, partial_budget=1)
    finally:
        torch.use_deterministic_algorithms(False)
    want = grads(lambda q, k, v: reference_moba_varlen(q, k, v, cu, 8, 3, scale=0.25)[0],
                 q.double(), k.double(), v.double(), do.double())
    for name, g, g_ref in zip("qkv", got, want):
        assert close(g, g_ref, 1e-4), f"d{name}: {rel_err(g, g_ref):.3g}"


@FEW
@given(case=varlen_cases(max_len=28, head_dims=(8, 16)))
def test_varlen_gradients_match_reference(case):
    assume(sum(case.lengths) > 0)  # no token, no gradient to compare
    q, k, v = case.tensors(torch.float32)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(case.seed + 1))
    args = (case.cu_seqlens, case.max_seqlen)
    got = grads(lambda q, k, v: me.moba_attention_varlen(q, k, v, *args, block_size=case.block_size,
                                                         top_k=case.top_k, impl="triton"), q, k, v, do)
    want = grads(lambda q, k, v: reference_moba_varlen(q, k, v, case.cu_seqlens, case.block_size, case.top_k)[0],
                 q.double(), k.double(), v.double(), do.double())
    for name, g, g_ref in zip("qkv", got, want):
        assert g.isfinite().all() and close(g, g_ref, 1e-4), f"d{name}"


@pytest.mark.parametrize("case", [
    Case(B=1, Hq=4, Hkv=2, S=53, D=16, block_size=8, top_k=3, seed=1),     # grouped heads, a short tail
    Case(B=2, Hq=2, Hkv=1, S=37, D=32, block_size=16, top_k=2, seed=2),
    Case(B=1, Hq=2, Hkv=2, S=29, D=8, block_size=5, top_k=9, seed=3),      # top_k past N: dense causal
])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 1.6e-2)])
def test_low_precision_gradients(case, dtype, tol):
    """float16 runs in float16 (P and dS rounded for the dots, as on a GPU); bfloat16 under the
    interpreter in float32, rounded at the end. The reference routes from the same rounded inputs."""
    check_batched(case, dtype, tol)


@pytest.mark.parametrize("top_k", [1, 7])
def test_top_k_extremes(top_k):
    """top_k = 1: block-local attention (no routed block anywhere); top_k past N: dense causal."""
    case = Case(B=1, Hq=2, Hkv=1, S=45, D=16, block_size=8, top_k=top_k, seed=4)
    check_batched(case)
    if top_k > case.n_blocks:
        q, k, v = case.tensors(torch.float32)
        do = torch.randn(q.shape)
        got = grads(lambda q, k, v: me.moba_attention(q, k, v, block_size=8, top_k=top_k, impl="triton"), q, k, v, do)
        want = grads(dense_causal, q.double(), k.double(), v.double(), do.double())
        assert all(close(g, g_ref, 1e-4) for g, g_ref in zip(got, want))


def test_lse_gradient():
    """A loss on lse too: d lse_t / d s_tj = P_tj, folded into the backward as Delta - dlse."""
    case = Case(B=2, Hq=2, Hkv=1, S=30, D=16, block_size=6, top_k=3, seed=5)
    q, k, v = case.tensors(torch.float32)
    gen = torch.Generator().manual_seed(6)
    do, dlse = torch.randn(q.shape, generator=gen), torch.randn(q.shape[:3], generator=gen)

    def loss(fn):
        def value(q, k, v):
            o, lse = fn(q, k, v)
            return (o * do.to(o.dtype)).sum() + (lse * dlse.to(lse.dtype)).sum()
        return value

    ones = torch.ones((), dtype=torch.float64)
    got = grads(loss(lambda q, k, v: me.moba_attention(q, k, v, block_size=6, top_k=3, impl="triton",
                                                       return_lse=True)), q, k, v, ones.float())
    want = grads(loss(lambda q, k, v: reference_moba(q, k, v, 6, 3)), q.double(), k.double(), v.double(), ones)
    assert all(close(g, g_ref, 1e-4) for g, g_ref in zip(got, want))


def test_packed_with_empty_and_single_token_sequences():
    gen = torch.Generator().manual_seed(7)
    lengths = [0, 19, 1, 0, 26, 1]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v = (torch.randn(47, h, 16, generator=gen) for h in (4, 2, 2))
    do = torch.randn(q.shape, generator=gen)
    got = grads(lambda q, k, v: me.moba_attention_varlen(q, k, v, cu, 26, block_size=4, top_k=3, impl="triton"),
                q, k, v, do)
    want = grads(lambda q, k, v: reference_moba_varlen(q, k, v, cu, 4, 3)[0], q.double(), k.double(), v.double(),
                 do.double())
    assert all(close(g, g_ref, 1e-4) for g, g_ref in zip(got, want))


def test_no_grad_and_partial_requires_grad():
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 33, 16, generator=gen) for _ in range(3))
    with torch.no_grad():
        o = me.moba_attention(q.requires_grad_(), k, v, block_size=8, top_k=2, impl="triton")
    assert o.grad_fn is None and not o.requires_grad
    o = me.moba_attention(q, k, v, block_size=8, top_k=2, impl="triton")   # only q requires grad
    (dq,) = torch.autograd.grad(o.sum(), q)
    q64 = q.detach().double().requires_grad_()
    (dq_ref,) = torch.autograd.grad(reference_moba(q64, k.double(), v.double(), 8, 2)[0].sum(), q64)
    assert rel_err(dq, dq_ref) < 1e-4
    o = me.moba_attention(q.detach(), k, v, block_size=8, top_k=2, impl="triton")
    assert o.grad_fn is None


def test_non_contiguous_views():
    gen = torch.Generator().manual_seed(9)
    qkv = torch.randn(2, 27, 3, 2, 16, generator=gen)   # [B, S, 3, H, D], a fused projection's layout
    do = torch.randn(2, 2, 27, 16, generator=gen)
    split = lambda x: [x[:, :, i].transpose(1, 2) for i in range(3)]  # noqa: E731

    def grad_qkv(fn, x):
        x = x.detach().requires_grad_()
        (g,) = torch.autograd.grad(fn(*split(x)), x, do.to(x.dtype))
        return g

    got = grad_qkv(lambda q, k, v: me.moba_attention(q, k, v, block_size=5, top_k=3, impl="triton"), qkv)
    want = grad_qkv(lambda q, k, v: reference_moba(q, k, v, 5, 3)[0], qkv.double())
    assert rel_err(got, want) < 1e-4


def backward_of(q, k, v, do, lengths, block_size, top_k, **kwargs):
    o, lse, sched = moba_forward(q, k, v, lengths, block_size, top_k, 0.25)
    return moba_backward(do, q, k, v, o, lse, sched.routed, sched.layout, 0.25, **kwargs)


@FEW
@given(case=varlen_cases(max_len=28, head_dims=(8, 16)), dq=st.sampled_from(["atomic", "slots"]),
       budget=st.sampled_from([None, 1]))
def test_both_routed_dq_paths_match_reference(case, dq, budget):
    """The routed dQ by atomic adds and per slot (launch_config's DQ; the GPU picks by block size), the
    latter in one chunk or one query tile per chunk, against the float64 reference."""
    assume(sum(case.lengths) > 0)
    q, k, v = case.tensors(torch.float32)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(case.seed + 1))
    got = backward_of(q, k, v, do, tuple(case.lengths), case.block_size, case.top_k, deterministic=False,
                      partial_budget=budget, config={"DQ": dq})
    want = grads(lambda q, k, v: reference_moba_varlen(q, k, v, case.cu_seqlens, case.block_size, case.top_k,
                                                       scale=0.25)[0], q.double(), k.double(), v.double(), do.double())
    for name, g, g_ref in zip("qkv", got, want):
        assert g.isfinite().all() and close(g, g_ref, 1e-4), f"d{name} ({dq}): {rel_err(g, g_ref):.3g}"


def test_wide_offsets_agree():
    """WIDE (64-bit offsets inside a sequence, for sequences spanning 2**31 elements) computes the same."""
    gen = torch.Generator().manual_seed(14)
    q, k, v, do = (torch.randn(2, h, 30, 16, generator=gen) for h in (2, 1, 1, 2))
    for deterministic in (False, True):
        narrow = backward_of(q, k, v, do, (30, 30), 8, 3, deterministic=deterministic)
        wide = backward_of(q, k, v, do, (30, 30), 8, 3, deterministic=deterministic, config={"WIDE": True})
        for a, b in zip(narrow, wide):
            torch.testing.assert_close(b, a)


def test_deterministic_mode_is_bitwise_reproducible():
    """torch.use_deterministic_algorithms(True): sorted buckets, per-slot dQ partials summed in order,
    chunked. Repeats give the same bits; other chunk sizes (which regroup the dK, dV sums into other
    tiles) and the atomic path agree to rounding."""
    gen = torch.Generator().manual_seed(10)
    lengths = (24, 0, 1, 19)
    q, k, v, do = (torch.randn(44, h, 16, generator=gen) for h in (4, 2, 2, 4))
    torch.use_deterministic_algorithms(True)
    try:
        first = grads(lambda q, k, v: me.moba_attention_varlen(
            q, k, v, torch.tensor([0, 24, 24, 25, 44]), 24, block_size=8, top_k=4, impl="triton"), q, k, v, do)
        second = backward_of(q, k, v, do, lengths, 8, 4)
        chunked = backward_of(q, k, v, do, lengths, 8, 4, partial_budget=1)   # one query tile per chunk
    finally:
        torch.use_deterministic_algorithms(False)
    atomic = backward_of(q, k, v, do, lengths, 8, 4, deterministic=False)
    for a, b, c, d in zip(first, second, chunked, atomic):
        assert torch.equal(a, b)
        assert rel_err(c, a) < 1e-6 and rel_err(d, a) < 1e-6


def test_sorted_pairs_sorts_each_bucket():
    gen = torch.Generator().manual_seed(11)
    lengths = (30, 0, 45)
    q, k = torch.randn(75, 4, 16, generator=gen), torch.randn(75, 2, 16, generator=gen)
    lay = layout.layout(lengths, 8, q.device, False)
    sched = router.schedule(router.packed_route(q, router.block_means(k, lay), lay, 4), lay, tiles_per_chunk=2)
    pairs = sorted_pairs(sched)
    offsets = sched.pair_offsets.tolist()
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        assert pairs[lo:hi].tolist() == sorted(sched.pair_slot[lo:hi].tolist())


def test_saves_only_what_the_backward_needs():
    """q, k, v, o (existing tensors), lse float32 [Hq, T] and routed int32 [Hq, T, R]: nothing else."""
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, h, 24, 16, generator=gen, requires_grad=True) for h in (4, 2, 2))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        o = me.moba_attention(q, k, v, block_size=8, top_k=3, impl="triton")
    shapes = sorted((tuple(x.shape), x.dtype) for x in saved)
    expected = sorted([(tuple(q.shape), q.dtype), (tuple(k.shape), k.dtype), (tuple(v.shape), v.dtype),
                       (tuple(o.shape), o.dtype), ((4, 48), torch.float32), ((4, 48, 2), torch.int32)])
    assert shapes == expected
    assert any(x.data_ptr() == q.data_ptr() for x in saved)   # the input itself, not a copy


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces impl="triton" as one custom op per pass (aot_eager here;
    Inductor on the GPU test)."""
    gen = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, h, 40, 16, generator=gen) for h in (2, 1, 1))
    do = torch.randn(q.shape, generator=gen)
    fn = lambda q, k, v: me.moba_attention(q, k, v, block_size=8, top_k=3, impl="triton")  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for a, b in zip(grads(compiled, q, k, v, do), grads(fn, q, k, v, do)):
        assert torch.equal(a, b)
