"""Every bad input of docs/design.md §2 gets its named error, before any rung runs; max_seqlen is
validated only; impl="triton" without a GPU warns once."""

import warnings

import numpy as np
import pytest
import torch

import moba_edu as me
from moba_edu import kernels


def qkv(B=1, Hq=2, Hkv=1, S=10, D=8, dtype=torch.float32):
    return torch.randn(B, Hq, S, D, dtype=dtype), torch.randn(B, Hkv, S, D, dtype=dtype), \
        torch.randn(B, Hkv, S, D, dtype=dtype)


def call(q, k, v, **kw):
    args = dict(block_size=4, top_k=2, impl="naive") | kw
    return me.moba_attention(q, k, v, **args)


def varlen(q, k, v, cu, max_seqlen, **kw):
    args = dict(block_size=4, top_k=2, impl="naive") | kw
    return me.moba_attention_varlen(q, k, v, cu, max_seqlen, **args)


@pytest.mark.parametrize("arg", ["q", "k", "v"])
def test_non_tensor(arg):
    t = dict(zip("qkv", qkv()))
    t[arg] = t[arg].tolist()
    with pytest.raises(TypeError, match=rf"^{arg} must be a torch.Tensor"):
        call(**t)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_integer_dtype(dtype):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="^q must be a floating tensor"):
        call(q.to(dtype), k, v)


def test_mixed_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q, k and v must share one dtype.*k torch.float16"):
        call(q, k.half(), v)


@pytest.mark.parametrize("which,shape,match", [
    ("q", (1, 2, 10), "q must have shape \\[B,H,S,D\\]"),
    ("k", (1, 1, 10, 8, 1), "k must have shape \\[B,H,S,D\\]"),
    ("v", (1, 1, 9, 8), "k and v must have the same shape"),
    ("kv", (1, 1, 9, 8), "q and k must agree"),
    ("q", (2, 2, 10, 8), "q and k must agree"),
    ("q", (1, 2, 10, 4), "q and k must agree"),
    ("q", (1, 3, 10, 8), "query heads \\(q: 3\\) must be a multiple .* \\(k: 2\\)"),
])
def test_shapes(which, shape, match):
    t = dict(zip("qkv", qkv(Hkv=2 if "heads" in match else 1)))
    for name in which:
        t[name] = torch.randn(shape)
    with pytest.raises(ValueError, match=match):
        call(**t)


@pytest.mark.parametrize("name", ["block_size", "top_k"])
@pytest.mark.parametrize("bad", [0, -1, 2.0, "4", True, None])
def test_block_size_and_top_k(name, bad):
    with pytest.raises(ValueError, match=f"^{name} must be an int >= 1"):
        call(*qkv(), **{name: bad})


@pytest.mark.parametrize("bad", ["1", float("nan"), float("inf"), torch.tensor(1.0)])
def test_scale(bad):
    with pytest.raises(ValueError, match="^scale must be None or a finite real number"):
        call(*qkv(), scale=bad)


def test_unknown_impl():
    with pytest.raises(ValueError, match="^impl must be one of"):
        call(*qkv(), impl="flash")


def test_devices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="q, k and v must be on one device"):
        call(q, k.to("meta"), v)


@pytest.mark.parametrize("router", [me.route, me.route_indices])
def test_route_checks_its_arguments(router):
    q, k, _ = qkv()
    with pytest.raises(ValueError, match="^top_k must be an int"):
        router(q, k, block_size=4, top_k=0)
    with pytest.raises(ValueError, match="q and k must agree"):
        router(q, k[:, :, :5], block_size=4, top_k=1)
    with pytest.raises(TypeError, match="^k must be a torch.Tensor"):
        router(q, k.tolist(), block_size=4, top_k=1)


@pytest.mark.parametrize("router", [me.route, me.route_indices])
def test_route_mixed_dtypes_name_only_q_and_k(router):
    q, k, _ = qkv()
    with pytest.raises(TypeError, match=r"^q and k must share one dtype, got q torch.float32, k torch.float16$"):
        router(q, k.half(), block_size=4, top_k=2)


def test_sequence_before_heads_gets_a_layout_hint():
    """[B, S, H, D] tensors with Hq != Hkv disagree on an axis; the error says how to fix the layout."""
    q, k, v = (x.transpose(1, 2) for x in qkv(Hq=4, Hkv=2))
    with pytest.raises(ValueError, match=r"moba_attention takes \[B,H,S,D\]; for \[B,S,H,D\] tensors, "
                                         r"transpose\(1, 2\) first"):
        call(q, k, v)
    with pytest.raises(ValueError, match=r"route takes \[B,H,S,D\]"):
        me.route(q, k, block_size=4, top_k=2)


def packed(T=10, Hq=2, Hkv=1, D=8):
    return torch.randn(T, Hq, D), torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)


@pytest.mark.parametrize("cu,max_seqlen,match", [
    ([1, 4, 10], 6, "cu_seqlens must start at 0"),
    ([0, 6, 4, 10], 6, "cu_seqlens must be non-decreasing"),
    ([0, 4, 9], 6, "cu_seqlens must end at T = 10"),
    ([0, 4, 10], 5, "max_seqlen \\(5\\) is smaller than the longest sequence \\(6\\)"),
    ([0, 4, 10], 6.0, "max_seqlen must be an int"),
    ([0, 4, 10], torch.tensor(6), "max_seqlen must be an int"),
    ([0, 4, 10], True, "max_seqlen must be an int"),
    ([0, 4, 10], -1, "max_seqlen \\(-1\\) is smaller than the longest sequence \\(6\\)"),
])
def test_cu_seqlens_values(cu, max_seqlen, match):
    with pytest.raises(ValueError, match=match):
        varlen(*packed(), torch.tensor(cu, dtype=torch.int32), max_seqlen)


def test_cu_seqlens_dtype_and_type():
    with pytest.raises(ValueError, match="cu_seqlens must be int32 or int64, got torch.float32"):
        varlen(*packed(), torch.tensor([0.0, 10.0]), 10)
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.Tensor"):
        varlen(*packed(), [0, 10], 10)
    with pytest.raises(ValueError, match="cu_seqlens must have shape \\[n\\+1\\]"):
        varlen(*packed(), torch.tensor([[0, 10]]), 10)


def test_varlen_rank():
    q, k, v = packed()
    with pytest.raises(ValueError, match="q must have shape \\[T,H,D\\]"):
        varlen(q[None], k, v, torch.tensor([0, 10]), 10)


def test_empty_sequences_are_valid():
    o = varlen(*packed(), torch.tensor([0, 0, 10, 10]), 10)
    assert o.shape == (10, 2, 8) and torch.isfinite(o).all()


@pytest.mark.parametrize("impl", ["naive", "torch", "triton"])
def test_max_seqlen_is_validated_only(impl):
    """Every rung reads the lengths from cu_seqlens: any max_seqlen >= the longest gives the same result
    (the same code runs, so the bits agree), a NumPy int included."""
    device = "cpu" if kernels.INTERPRET else "cuda"  # the kernels take CUDA tensors on a GPU machine
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(23, h, 8, generator=gen).to(device) for h in (2, 1, 1))
    cu = torch.tensor([0, 9, 9, 23], dtype=torch.int32, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # impl="triton" under the interpreter warns that it is slow
        tight = varlen(q, k, v, cu, 14, impl=impl, return_lse=True)
        loose = varlen(q, k, v, cu, 1000, impl=impl, return_lse=True)
        numpy = varlen(q, k, v, cu, np.int64(14), impl=impl, return_lse=True)
    for other in (loose, numpy):
        assert torch.equal(tight[0], other[0]) and torch.equal(tight[1], other[1])


@pytest.mark.skipif(not kernels.INTERPRET, reason="the kernels run on a GPU here, not the interpreter")
def test_triton_under_the_interpreter_warns_once(monkeypatch):
    monkeypatch.setattr(kernels, "warn_interpreter", True)  # as in a fresh process
    q, k, v = qkv(S=6)
    with pytest.warns(UserWarning, match="impl='triton' runs under Triton's CPU interpreter") as caught:
        call(q, k, v, impl="triton")
        call(q, k, v, impl="triton")
    assert len(caught) == 1 and caught[0].filename == __file__  # once, pointing at the caller
    assert kernels.warn_interpreter is False


@pytest.mark.skipif(not kernels.INTERPRET, reason="the kernels run on a GPU here, not the interpreter")
def test_the_interpreter_warning_can_be_silenced(monkeypatch):
    monkeypatch.setattr(kernels, "warn_interpreter", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(*qkv(S=6), impl="triton")
