"""The notebook-05 kernels: the primer (vector add, row softmax, tiled matmul, online softmax) against
torch, and the dense causal FlashAttention forward against the float64 reference.

On a CPU they run under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1), so shapes are tiny
and every length is ragged on purpose. The `gpu` tests run the same kernels at real sizes.
"""

import math

import pytest
import torch

from moba_edu.kernels import flash, primer
from reference import dense_causal
from strategies import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 `tl.dot` is exact in the interpreter but TF32 (10-bit mantissa) on a GPU.
FP32_TOL = 2e-3 if DEVICE == "cuda" else 1e-5


def randn(*shape, dtype=torch.float32, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)


def causal_lse(q, k, scale=None):
    """float64 [B, H, S]: logsumexp of the scaled, causally masked scores (grouped heads repeated)."""
    S, D = q.shape[-2:]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q.double() @ k.double().transpose(-1, -2) * (1 / math.sqrt(D) if scale is None else scale)
    future = torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, -math.inf).logsumexp(-1)


# --- primer -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, block", [(1, 16), (37, 16), (64, 32), (130, 64)])
def test_add_matches_torch_including_the_ragged_tail(n, block):
    x, y = randn(n, seed=1), randn(n, seed=2)
    torch.testing.assert_close(primer.add(x, y, block=block), x + y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M, N", [(1, 1), (5, 45), (3, 64)])
def test_softmax_matches_torch(M, N, dtype):
    x = randn(M, N + 7, dtype=dtype)[:, 3:N + 3]   # strided rows: a view, not a copy
    out = primer.softmax(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), x.float().softmax(-1), atol=1e-3 if dtype == torch.float16 else 1e-6,
                               rtol=1e-3 if dtype == torch.float16 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M, K, N", [(40, 33, 21), (16, 16, 16), (1, 50, 3)])
def test_matmul_matches_torch(M, K, N, dtype):
    a = randn(M, K, dtype=dtype, seed=3)
    b = randn(N, K, dtype=dtype, seed=4).T          # a transposed view: strides, not a contiguous copy
    c = primer.matmul(a, b)
    ref = a.double() @ b.double()
    assert c.dtype == dtype and c.shape == (M, N)
    assert rel_err(c, ref) < (2e-3 if dtype == torch.float16 else FP32_TOL)


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("M, N", [(3, 1), (4, 45), (2, 96)])
def test_online_softmax_matches_torch_and_is_stable(M, N, block):
    x = randn(M, N) * 60                            # exp(60) would overflow float16; the running max keeps it finite
    out, lse = primer.online_softmax(x, block=block)
    torch.testing.assert_close(out.double(), x.double().softmax(-1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), x.double().logsumexp(-1), atol=1e-5, rtol=1e-6)


# --- dense causal FlashAttention forward ----------------------------------------------------------------

FLASH_SHAPES = [  # B, H, Hkv, S, D: ragged S everywhere, grouped heads, head dims 16 / 32 / 64 / 24 (padded)
    (1, 2, 2, 45, 16), (2, 2, 1, 37, 32), (1, 1, 1, 20, 64), (1, 4, 2, 64, 32), (1, 1, 1, 1, 16), (1, 2, 1, 23, 24),
]
TOLERANCE = {torch.float32: FP32_TOL, torch.float16: 2e-3}   # fp16 rounds the probabilities before P @ V


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B, H, Hkv, S, D", FLASH_SHAPES)
def test_flash_forward_matches_reference(B, H, Hkv, S, D, dtype):
    q, k, v = randn(B, H, S, D, dtype=dtype, seed=5), randn(B, Hkv, S, D, dtype=dtype, seed=6), \
        randn(B, Hkv, S, D, dtype=dtype, seed=7)
    o, lse = flash.flash_attention(q, k, v)
    assert o.dtype == dtype and o.shape == q.shape and lse.dtype == torch.float32 and lse.shape == (B, H, S)
    assert rel_err(o, dense_causal(q, k, v)) < TOLERANCE[dtype]
    torch.testing.assert_close(lse.double(), causal_lse(q, k), atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize("block_m, block_n", [(16, 16), (32, 16), (32, 32)])
def test_flash_forward_tile_sizes_do_not_change_the_answer(block_m, block_n):
    q, k, v = randn(1, 2, 50, 16, seed=8), randn(1, 2, 50, 16, seed=9), randn(1, 2, 50, 16, seed=10)
    o, lse = flash.flash_attention(q, k, v, block_m=block_m, block_n=block_n)
    assert rel_err(o, dense_causal(q, k, v)) < FP32_TOL
    torch.testing.assert_close(lse.double(), causal_lse(q, k), atol=FP32_TOL, rtol=FP32_TOL)


def test_flash_forward_takes_views_scale_and_bfloat16():
    qkv = randn(2, 33, 3, 2, 16, seed=11)           # [B, S, (q, k, v), H, D]: every tensor a strided view
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    o, lse = flash.flash_attention(q, k, v, scale=0.3)
    assert rel_err(o, dense_causal(q, k, v, scale=0.3)) < FP32_TOL
    torch.testing.assert_close(lse.double(), causal_lse(q, k, scale=0.3), atol=FP32_TOL, rtol=FP32_TOL)
    o16, _ = flash.flash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert o16.dtype == torch.bfloat16
    assert rel_err(o16, dense_causal(q.bfloat16(), k.bfloat16(), v.bfloat16())) < 1e-2


def test_flash_forward_empty_sequence():
    o, lse = flash.flash_attention(*(randn(1, 2, 0, 16) for _ in range(3)))
    assert o.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)


# --- GPU: real sizes (run on the H200) -------------------------------------------------------------------

@pytest.mark.gpu
def test_primer_at_gpu_sizes():
    x, y = randn(1_000_003, seed=1), randn(1_000_003, seed=2)
    torch.testing.assert_close(primer.add(x, y, block=1024), x + y)
    rows = randn(4096, 1000, dtype=torch.float16)
    torch.testing.assert_close(primer.softmax(rows).float(), rows.float().softmax(-1), atol=1e-3, rtol=1e-3)
    a, b = randn(1000, 1030, dtype=torch.float16, seed=3), randn(1030, 990, dtype=torch.float16, seed=4)
    assert rel_err(primer.matmul(a, b, 128, 128, 32), a.double() @ b.double()) < 2e-3
    long_rows = randn(16, 100_001) * 30
    out, lse = primer.online_softmax(long_rows, block=1024)
    torch.testing.assert_close(out, long_rows.softmax(-1), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(lse, long_rows.logsumexp(-1), atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H, Hkv, S, D", [(4, 4, 1024, 64), (4, 4, 4095, 128), (8, 2, 8192, 128), (2, 2, 3001, 64)])
def test_flash_forward_at_gpu_sizes_is_as_accurate_as_sdpa(H, Hkv, S, D, dtype):
    q, k, v = randn(1, H, S, D, dtype=dtype, seed=5), randn(1, Hkv, S, D, dtype=dtype, seed=6), \
        randn(1, Hkv, S, D, dtype=dtype, seed=7)
    o, lse = flash.flash_attention(q, k, v)
    exact = torch.nn.functional.scaled_dot_product_attention(  # float32 from the same rounded inputs
        q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert rel_err(o, exact) <= 2 * rel_err(sdpa, exact) + 1e-4
    for h in range(H):                             # one head at a time keeps the [S, S] scores small
        kv = h // (H // Hkv)
        torch.testing.assert_close(lse[:, h:h + 1].double(), causal_lse(q[:, h:h + 1], k[:, kv:kv + 1]),
                                   atol=2e-3, rtol=1e-4)
