"""Every PyTorch rung against the float64 reference over the property space of strategies.py.

The Triton rung has its own files (smaller shapes under the interpreter); the rungs listed here are
cheap enough on a CPU for the full space.
"""

import pytest
import torch
from hypothesis import assume, given

import moba_edu as me
from reference import reference_moba, reference_moba_varlen
from strategies import cases, rel_err, varlen_cases

RUNGS = ["naive", "torch"]


@pytest.mark.parametrize("impl", RUNGS)
@given(case=cases())
def test_forward_matches_reference(impl, case):
    q, k, v = case.tensors(torch.float32)
    o, lse = me.moba_attention(q, k, v, block_size=case.block_size, top_k=case.top_k, impl=impl, return_lse=True)
    o_ref, lse_ref = reference_moba(q, k, v, case.block_size, case.top_k)
    assert o.dtype == torch.float32 and o.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    torch.testing.assert_close(o.double(), o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), lse_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", RUNGS)
@given(case=varlen_cases())
def test_varlen_matches_reference(impl, case):
    q, k, v = case.tensors(torch.float32)
    o, lse = me.moba_attention_varlen(q, k, v, case.cu_seqlens, case.max_seqlen, block_size=case.block_size,
                                      top_k=case.top_k, impl=impl, return_lse=True)
    o_ref, lse_ref = reference_moba_varlen(q, k, v, case.cu_seqlens, case.block_size, case.top_k)
    assert o.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
    torch.testing.assert_close(o.double(), o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), lse_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", RUNGS)
@given(case=cases(max_s=24, head_dims=(4, 8)))
def test_gradients_match_reference(impl, case):
    q, k, v = case.tensors(torch.float32, requires_grad=True)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(case.seed + 1))
    o = me.moba_attention(q, k, v, block_size=case.block_size, top_k=case.top_k, impl=impl)
    grads = torch.autograd.grad(o, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o_ref, _ = reference_moba(q64, k64, v64, case.block_size, case.top_k)
    grads_ref = torch.autograd.grad(o_ref, (q64, k64, v64), do.double())
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-4, f"d{name}"


@pytest.mark.parametrize("impl", RUNGS)
@given(case=varlen_cases(max_len=20, head_dims=(4, 8)))
def test_varlen_gradients_match_reference(impl, case):
    assume(sum(case.lengths) > 0)  # no token, no gradient to compare
    q, k, v = case.tensors(torch.float32, requires_grad=True)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(case.seed + 1))
    o = me.moba_attention_varlen(q, k, v, case.cu_seqlens, case.max_seqlen, block_size=case.block_size,
                                 top_k=case.top_k, impl=impl)
    grads = torch.autograd.grad(o, (q, k, v), do, allow_unused=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o_ref, _ = reference_moba_varlen(q64, k64, v64, case.cu_seqlens, case.block_size, case.top_k)
    grads_ref = torch.autograd.grad(o_ref, (q64, k64, v64), do.double(), allow_unused=True)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        g = torch.zeros_like(q64 if name == "q" else k64) if g is None else g
        g_ref = torch.zeros_like(g, dtype=torch.float64) if g_ref is None else g_ref
        assert rel_err(g, g_ref) < 1e-4, f"d{name}"


@pytest.mark.parametrize("impl", RUNGS)
def test_gradcheck_float64(impl):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 11, 4, generator=gen, dtype=torch.float64, requires_grad=True) for h in (2, 1, 1))
    fn = lambda q, k, v: me.moba_attention(q, k, v, block_size=3, top_k=2, impl=impl)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("impl", RUNGS)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2), (torch.float64, 1e-12)])
def test_dtypes(impl, dtype, tol):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 37, 16, generator=gen).to(dtype) for h in (4, 2, 2))
    o = me.moba_attention(q, k, v, block_size=8, top_k=3, impl=impl)
    assert o.dtype == dtype
    o_ref, _ = reference_moba(q, k, v, 8, 3)  # routes from the same low-precision inputs
    assert rel_err(o, o_ref) < tol


@pytest.mark.parametrize("impl", RUNGS)
def test_non_contiguous_views(impl):
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(2, 29, 3, 4, 8, generator=gen)  # [B, S, 3, H, D], a fused projection's layout
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    o = me.moba_attention(q, k, v, block_size=5, top_k=2, impl=impl)
    o_ref, _ = reference_moba(q, k, v, 5, 2)
    torch.testing.assert_close(o.double(), o_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", RUNGS)
def test_autocast(impl):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 33, 8, generator=gen) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = me.moba_attention(q, k, v, block_size=8, top_k=2, impl=impl)
    assert o.dtype == torch.bfloat16
    o_ref, _ = reference_moba(q.bfloat16(), k.bfloat16(), v.bfloat16(), 8, 2)
    assert rel_err(o, o_ref) < 1.6e-2


@pytest.mark.parametrize("impl", RUNGS)
def test_empty_inputs(impl):
    q = torch.randn(2, 2, 0, 8)
    assert me.moba_attention(q, q, q, block_size=4, top_k=2, impl=impl).shape == q.shape
    q = torch.randn(0, 2, 8)
    cu = torch.tensor([0], dtype=torch.int32)
    o, lse = me.moba_attention_varlen(q, q, q, cu, 0, block_size=4, top_k=2, impl=impl, return_lse=True)
    assert o.shape == q.shape and lse.shape == (2, 0)
