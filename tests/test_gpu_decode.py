"""MoBA decoding on a CUDA GPU (run: python3 -m pytest -m gpu -p no:nbval tests/test_gpu_decode.py).

The Triton decode router against float32 gates of the stored means (sets per query; a near-tie may
flip), attention in bfloat16 and float16 against float64 given the kernel's routing (docs/design.md §1),
a long cache, prefill + token-by-token decoding against the Triton forward, and the GPU errors.
`python3 tests/test_gpu_decode.py` runs the compute-sanitizer shapes.
"""

import math

import pytest
import torch

import moba_edu as me
from moba_edu import kernels
from strategies import rel_err

pytestmark = pytest.mark.gpu

if torch.cuda.is_available() and not kernels.INTERPRET:
    from moba_edu.kernels.decode import attend_pages, route_pages


def filled_cache(lengths, Hkv, D, block_size, dtype, seed, spare=0):
    """A cache holding random keys and values: sequence b has lengths[b] tokens."""
    B, L = len(lengths), max(lengths)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    k, v = (torch.randn(B, Hkv, L, D, generator=gen, device="cuda").to(dtype) for _ in range(2))
    cache = me.MobaKVCache(B, Hkv, D, block_size=block_size, max_seqlen=L + spare, dtype=dtype, device="cuda")
    cache.append(k, v, lengths=lengths)
    return cache


def float32_routing(q, cache, top_k, start, lengths):
    """Routed block sets by float32 gates q . mean over the stored means, bool [B, s, Hq, N]."""
    B, Hq, s, _ = q.shape
    g = Hq // cache.num_kv_heads
    n_blocks = cache.page_table.shape[1]
    means = cache.means[cache.page_table.long().clamp_min(0)].repeat_interleave(g, 2)   # [B, N, Hq, D]
    gates = torch.einsum("bhsd,bnhd->bshn", q.float(), means)
    pos = (start[:, None] + torch.arange(s)).cuda()
    own = (pos // cache.block_size)[:, :, None, None]
    gates = gates.masked_fill(torch.arange(n_blocks, device="cuda") >= own, -math.inf)
    chosen = torch.zeros_like(gates, dtype=torch.bool)
    R = min(top_k - 1, n_blocks)
    if R:
        best, idx = gates.topk(R, dim=-1)
        chosen.scatter_(-1, idx, best > -math.inf)
    return chosen


def routed_sets(routed, n_blocks):
    """int32 [B, s, Hq, R] (-1: none) -> bool [B, s, Hq, N]."""
    sets = torch.zeros(*routed.shape[:3], n_blocks + 1, dtype=torch.bool, device=routed.device)
    sets.scatter_(-1, torch.where(routed >= 0, routed.long(), n_blocks), True)
    return sets[..., :n_blocks]


def float64_given_routing(q, cache, routed, scale, start, lengths):
    """Per query row and head, float64 softmax over the own block (causally) and the routed blocks."""
    B, Hq, s, D = q.shape
    g = Hq // cache.num_kv_heads
    o = torch.zeros(B, Hq, s, D, dtype=torch.float64, device="cuda")
    sets = routed_sets(routed, cache.page_table.shape[1])
    for b in range(B):
        k, v = cache.sequence(b)
        for i in range(int(lengths[b])):
            t = int(start[b]) + i
            blocks = torch.arange(t + 1, device="cuda") // cache.block_size
            for h in range(Hq):
                keep = sets[b, i, h][blocks] | (blocks == t // cache.block_size)
                scores = (k[h // g, :t + 1][keep].double() @ q[b, h, i].double()) * scale
                o[b, h, i] = scores.softmax(0) @ v[h // g, :t + 1][keep].double()
    return o


@pytest.mark.parametrize("lengths,Hq,Hkv,block_size,top_k", [((32768, 20000), 16, 4, 512, 8),
                                                             ((8192, 1, 5000), 8, 8, 128, 12)])
def test_router_matches_float32_gates(lengths, Hq, Hkv, block_size, top_k):
    cache = filled_cache(lengths, Hkv, 128, block_size, torch.bfloat16, 0)
    s = 4
    lens = torch.tensor([min(s, n) for n in lengths])
    start = torch.tensor(lengths) - lens
    q = torch.randn(len(lengths), Hq, s, 128, device="cuda").bfloat16()
    got = routed_sets(route_pages(q, cache, top_k, start, lens), cache.page_table.shape[1])
    expected = float32_routing(q, cache, top_k, start, lens)
    rows = torch.arange(s)[None, :] < lens[:, None]
    same = (got == expected).all(-1)[rows.cuda()]
    assert same.float().mean() > 0.999


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths,s,Hq,Hkv,D,block_size,top_k", [
    ((4096, 1000, 1), 1, 8, 2, 128, 256, 4),      # ragged, a length-1 sequence, GQA, tails
    ((3000, 2999), 3, 4, 4, 64, 100, 3),          # chunk of 3 queries crossing a block boundary
    ((2048,), 2, 4, 1, 96, 256, 20),              # top_k past the number of blocks: dense causal
    ((2500, 700), 2, 8, 2, 256, 128, 4),          # the largest head dim the kernels take
    ((1500,), 1, 4, 4, 192, 256, 3),              # a head dim padded to 256
])
def test_decode_matches_float64_given_routing(dtype, lengths, s, Hq, Hkv, D, block_size, top_k):
    cache = filled_cache(lengths, Hkv, D, block_size, dtype, 1)
    lens = torch.tensor([min(s, n) for n in lengths])
    start = torch.tensor(lengths) - lens
    q = torch.randn(len(lengths), Hq, s, D, device="cuda").to(dtype)
    routed = route_pages(q, cache, top_k, start, lens)
    o, lse = attend_pages(q, cache, routed, D ** -0.5, start, lens)
    o_ref = float64_given_routing(q, cache, routed, D ** -0.5, start, lens)
    assert rel_err(o, o_ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)
    assert torch.isfinite(lse[(torch.arange(s)[None, None, :] < lens[:, None, None]).expand(lse.shape).cuda()]).all()
    o_api = me.moba_decode(q, cache, top_k=top_k, lengths=lens)          # auto: the Triton rung
    assert rel_err(o_api, o_ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_long_cache_matches_torch_rung():
    cache = filled_cache((131072,), 16, 128, 512, torch.bfloat16, 2)
    q = torch.randn(1, 16, 1, 128, device="cuda").bfloat16()
    o = me.moba_decode(q, cache, top_k=8, impl="triton")
    o_torch = me.moba_decode(q, cache, top_k=8, impl="torch")
    assert rel_err(o, o_torch) < 1e-2


def test_prefill_then_decode_matches_the_triton_forward():
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(2, h, 3000, 128, generator=gen, device="cuda").bfloat16() for h in (8, 2, 2))
    full = me.moba_attention(q, k, v, block_size=256, top_k=4, impl="triton")
    cache = me.MobaKVCache(2, 2, 128, block_size=256, max_seqlen=3000, dtype=torch.bfloat16, device="cuda")
    cache.append(k[:, :, :2900], v[:, :, :2900])
    outs = [me.moba_decode(q[:, :, :2900], cache, top_k=4)]
    for t in range(2900, 3000):
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        outs.append(me.moba_decode(q[:, :, t:t + 1], cache, top_k=4))
    assert rel_err(torch.cat(outs, 2), full) < 1e-2


def test_errors_on_gpu():
    cache = filled_cache((100,), 2, 64, 16, torch.float16, 4, spare=1)
    q = torch.randn(1, 2, 1, 64, device="cuda").half()
    with pytest.raises(ValueError, match="q is on cpu"):
        me.moba_decode(q.cpu(), cache, top_k=2)
    cpu_cache = me.MobaKVCache(1, 2, 64, block_size=16, max_seqlen=8, dtype=torch.float16)
    cpu_cache.append(q.cpu(), q.cpu())
    with pytest.raises(ValueError, match="q is on the CPU"):
        me.moba_decode(q.cpu(), cpu_cache, top_k=2, impl="triton")
    with pytest.raises(ValueError, match="full"):
        cache.append(torch.zeros(1, 2, 2, 64, device="cuda").half(), torch.zeros(1, 2, 2, 64, device="cuda").half())


def test_decode_suite_measures_its_smallest_points(tmp_path):
    """The `decode` benchmark suite end to end at 32K: B = 1 with 16 heads, and B = 8 grouped (SDPA with
    enable_gqa); every SDPA backend either timed or recorded as skipped with its reason."""
    import json

    from moba_edu.bench import decode, harness

    only = ["decode/S32768-bs512-k3-h16x16-B1", "decode/S32768-bs128-k8-h32x8-B8"]
    written = harness.run("gpu", only, tmp_path)
    assert [p.name for p in written] == [f"{pattern.replace('/', '-')}.json" for pattern in only]
    single, grouped = (json.loads(p.read_text()) for p in written)
    assert single["pages_read"] == 16 * 3                            # every head reads its own top_k pages
    assert single["bytes_read"] == single["bytes"]["moba"] == decode.decode_bytes(32768, 16, 512, 3)["moba"]
    assert 8 * 8 * 8 <= grouped["pages_read"] <= 8 * 8 * (1 + 4 * 7)  # a group's 4 heads may choose apart
    for r in (single, grouped):
        assert r["moba_ms"] > 0 and r["floor_ms"] > 0 and r["over_floor"] == r["moba_ms"] / r["floor_ms"]
        assert r["moba_peak_bytes"] >= 0 and r["step_overhead_ms"] > 0
        for name in ("cudnn", "flash"):
            assert (r[f"{name}_ms"] is None) == (f"{name}_skipped" in r)
            assert r[f"{name}_ms"] is None or r[f"speedup_vs_{name}"] == r[f"{name}_ms"] / r["moba_ms"]
        assert r["goal_speedup_vs_sdpa"] is None and r["floor_goal_met"] in (None, True, False)
    assert single["cudnn_ms"] is not None or single["flash_ms"] is not None   # some SDPA backend takes B = 1


def sanitize_shapes():
    """Decode at a ragged and an aligned shape, for compute-sanitizer (from the repository root):
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 PYTHONPATH=. compute-sanitizer --tool memcheck python3 tests/test_gpu_decode.py"""
    for lengths, s, Hq, Hkv, D, block_size, top_k in [((3000, 1, 700), 3, 8, 2, 96, 100, 5),
                                                      ((4096,), 1, 4, 4, 128, 256, 4),
                                                      ((2500, 700), 2, 8, 2, 192, 128, 4)]:
        cache = filled_cache(lengths, Hkv, D, block_size, torch.bfloat16, 5)
        lens = torch.tensor([min(s, n) for n in lengths])
        q = torch.randn(len(lengths), Hq, s, D, device="cuda").bfloat16()
        o, lse = me.moba_decode(q, cache, top_k=top_k, impl="triton", lengths=lens, return_lse=True)
        torch.cuda.synchronize()
        print(f"lengths {lengths}, s {s}: o finite: {bool(o.isfinite().all())}")


if __name__ == "__main__":
    sanitize_shapes()
