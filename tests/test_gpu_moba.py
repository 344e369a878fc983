"""The Triton router and MoBA forward on a CUDA GPU (run: python3 -m pytest -m gpu -p no:nbval tests/test_gpu_moba.py).

bf16 and fp16 against float64 attention per head up to S = 8K, and at 32K and 128K against the float32
torch rung (efficient.attend), in both cases given the Triton router's routing: a near-tie between two
gates may legitimately flip one block, so routing is checked on its own (against routing.py) and
attention is compared given one routing (docs/design.md §1).
"""

import math

import pytest
import torch

import moba_edu as me
from moba_edu import efficient, kernels
from strategies import rel_err

pytestmark = pytest.mark.gpu

if torch.cuda.is_available() and not kernels.INTERPRET:
    from moba_edu.kernels.moba_fwd import moba_forward


def random_qkv(shape_q, shape_kv, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(s, generator=gen, device="cuda").to(dtype) for s in (shape_q, shape_kv, shape_kv))


def global_routed(sched) -> torch.Tensor:
    """The schedule's routing as global block numbers, int64 [T, Hq, R] (-1: none), efficient.attend's form."""
    lay = sched.layout
    first = torch.repeat_interleave(lay.tiles[:, 3].long(), lay.tiles[:, 2].long())   # per token: block 0 of its sequence
    routed = sched.routed.long().transpose(0, 1)
    return torch.where(routed >= 0, routed + first[:, None, None], routed)


def float64_given_routing(q, k, v, sched, lengths, block_size, scale):
    """Per head and sequence, float64 softmax attention over the own block (causally) and the routed
    blocks of `sched`: packed q [T, Hq, D] -> o [T, Hq, D], lse [Hq, T]."""
    T, Hq, D = q.shape
    g = Hq // k.shape[1]
    o = torch.empty(T, Hq, D, dtype=torch.float64, device=q.device)
    lse = torch.empty(Hq, T, dtype=torch.float64, device=q.device)
    start = 0
    for n in lengths:
        pos = torch.arange(n, device=q.device)
        key_block = pos // block_size
        for h in range(Hq):
            chosen = torch.zeros(n, -(-n // block_size) + 1, dtype=torch.bool, device=q.device)
            routed = sched.routed[h, start:start + n].long()
            chosen.scatter_(1, torch.where(routed >= 0, routed, chosen.shape[1] - 1), True)
            chosen[pos, key_block] = True
            mask = chosen[:, key_block] & (pos[None, :] <= pos[:, None])
            s = (q[start:start + n, h].double() @ k[start:start + n, h // g].double().T) * scale
            s = s.masked_fill(~mask, -math.inf)
            lse[h, start:start + n] = s.logsumexp(-1)
            o[start:start + n, h] = s.softmax(-1) @ v[start:start + n, h // g].double()
        start += n
    return o, lse


@pytest.mark.parametrize("S,block_size,top_k", [(8192, 512, 3), (4096, 128, 8), (3000, 256, 12)])
def test_router_matches_routing(S, block_size, top_k):
    q, k, _ = random_qkv((1, 4, S, 128), (1, 2, S, 128), torch.bfloat16, 0)
    _, _, sched = moba_forward(q, k, k, (S,), block_size, top_k, 128 ** -0.5)
    expected = me.route(q, k, block_size=block_size, top_k=top_k).indices[0, ..., 1:]   # [Hq, S, R]
    got = sched.routed.long()
    # Sets per query (order can differ only on near-ties); float32 summation order may flip a near-tie.
    same = (got.sort(-1).values == expected.sort(-1).values).all(-1)
    assert same.float().mean() > 0.999


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths,Hq,Hkv,D,block_size,top_k", [
    ((8192,), 4, 4, 128, 512, 3),
    ((4096,), 4, 2, 64, 128, 8),
    ((1000, 0, 1, 2777), 4, 1, 128, 100, 4),     # packed, ragged tails, empty and length-1 sequences
    ((2048,), 2, 2, 96, 256, 20),                # top_k past the number of blocks: dense causal
    pytest.param((1000, 0, 1, 2777), 4, 1, 200, 100, 4, id="head_dim200-packed"),   # padded to 256
    pytest.param((4096,), 4, 2, 256, 512, 3, id="head_dim256"),
])
def test_forward_matches_float64(dtype, lengths, Hq, Hkv, D, block_size, top_k):
    T = sum(lengths)
    q, k, v = random_qkv((T, Hq, D), (T, Hkv, D), dtype, 1)
    scale = D ** -0.5
    o, lse, sched = moba_forward(q, k, v, lengths, block_size, top_k, scale)
    o_ref, lse_ref = float64_given_routing(q, k, v, sched, lengths, block_size, scale)
    assert rel_err(o, o_ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)
    assert (lse.double() - lse_ref).abs().max() < 1e-2


@pytest.mark.parametrize("S,Hq,Hkv,block_size,top_k", [(32768, 16, 16, 512, 3), (32768, 32, 8, 128, 8),
                                                       (131072, 4, 4, 512, 3)])
def test_long_forward_matches_torch_rung(S, Hq, Hkv, block_size, top_k):
    q, k, v = random_qkv((1, Hq, S, 128), (1, Hkv, S, 128), torch.bfloat16, 2)
    o, lse = me.moba_attention(q, k, v, block_size=block_size, top_k=top_k, impl="triton", return_lse=True)
    _, _, sched = moba_forward(q, k, v, (S,), block_size, top_k, 128 ** -0.5)
    pack = lambda x: x[0].transpose(0, 1).float()   # noqa: E731  [1, H, S, D] -> [S, H, D] float32
    table = efficient.BlockTable.build(torch.tensor([0, S], device="cuda"), S, block_size)
    o_ref, lse_ref = efficient.attend(pack(q), pack(k), pack(v), table, global_routed(sched), 128 ** -0.5)
    assert rel_err(o[0].transpose(0, 1), o_ref) < 1e-2
    assert (lse[0] - lse_ref).abs().max() < 1e-2


@pytest.mark.parametrize("D,block_size,top_k", [(192, 512, 3), (256, 128, 8)])
def test_large_head_dim_forward_matches_torch_rung(D, block_size, top_k):
    """Head dims past 128 (smaller tiles, launch_config): routing against routing.py, attention against
    the float32 torch rung given the Triton routing; S = 4K, 8 query / 2 key-value heads."""
    S, scale = 4096, D ** -0.5
    q, k, v = random_qkv((1, 8, S, D), (1, 2, S, D), torch.bfloat16, 20)
    assert kernels.unsupported(q, k, v) is None    # impl="auto" takes the kernels here
    o, lse, sched = moba_forward(q, k, v, (S,), block_size, top_k, scale)
    expected = me.route(q, k, block_size=block_size, top_k=top_k).indices[0, ..., 1:]   # [Hq, S, R]
    assert (sched.routed.long().sort(-1).values == expected.sort(-1).values).all(-1).float().mean() > 0.999
    pack = lambda x: x[0].transpose(0, 1).float()   # noqa: E731  [1, H, S, D] -> [S, H, D] float32
    table = efficient.BlockTable.build(torch.tensor([0, S], device="cuda"), S, block_size)
    o_ref, lse_ref = efficient.attend(pack(q), pack(k), pack(v), table, global_routed(sched), scale)
    assert rel_err(o[0].transpose(0, 1), o_ref) < 1e-2
    assert (lse - lse_ref).abs().max() < 1e-2


def test_chunks_change_nothing_on_gpu():
    q, k, v = random_qkv((20000, 8, 128), (20000, 2, 128), torch.bfloat16, 3)
    lengths = (12000, 8000)
    one = moba_forward(q, k, v, lengths, 256, 6, 0.1, partial_budget=2**40)
    many = moba_forward(q, k, v, lengths, 256, 6, 0.1, partial_budget=2**22)
    assert many[2].n_chunks > 1 == one[2].n_chunks
    torch.testing.assert_close(many[0], one[0])   # bfloat16's tolerance: partials merge in another order
    torch.testing.assert_close(many[1], one[1])


def test_api_and_errors_on_gpu():
    q, k, v = random_qkv((2, 4, 1000, 64), (2, 2, 1000, 64), torch.float16, 4)
    o = me.moba_attention(q, k, v, block_size=64, top_k=3, impl="triton")
    o_torch = me.moba_attention(q, k, v, block_size=64, top_k=3, impl="torch")
    assert rel_err(o, o_torch) < 2e-3       # may differ by a near-tie flip at most: tiny here
    with pytest.raises(ValueError, match="q is on the CPU"):
        me.moba_attention(q.cpu(), k.cpu(), v.cpu(), block_size=64, top_k=3, impl="triton")
    with pytest.raises(TypeError, match="q"):
        me.moba_attention(q.double(), k.double(), v.double(), block_size=64, top_k=3, impl="triton")


def sanitize_shapes():
    """Router and forward at one aligned and one ragged shape (S <= 4K), for compute-sanitizer:
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 PYTHONPATH=. compute-sanitizer --tool memcheck python3 tests/test_gpu_moba.py"""
    for lengths, Hq, Hkv, D, block_size, top_k in [((4096,), 4, 2, 128, 256, 4), ((1000, 0, 1, 2777), 4, 1, 96, 100, 5)]:
        T = sum(lengths)
        q, k, v = random_qkv((T, Hq, D), (T, Hkv, D), torch.bfloat16, 5)
        o, lse, sched = moba_forward(q, k, v, lengths, block_size, top_k, D ** -0.5, partial_budget=2**20)
        torch.cuda.synchronize()
        print(f"lengths {lengths}: {sched.n_chunks} chunks, o finite: {bool(o.isfinite().all())}, "
              f"lse finite: {bool(lse.isfinite().all())}")


if __name__ == "__main__":
    sanitize_shapes()
