"""The decode benchmark suite (moba_edu.bench.decode) on a CPU: its points, memory plan, page counts,
goals and figure; one tiny point measured for real under the Triton interpreter (the GPU timers
replaced by wall-clock ones: no time is asserted). The GPU run is tests/test_gpu_decode.py."""

import json
import statistics
import time

import pytest
import torch

from moba_edu.bench import suites  # noqa: I001  (first: importing it registers every suite in run order)
from moba_edu.bench import decode, harness
from moba_edu.routing import block_means
from strategies import rel_err

H200_BYTES = 139 * harness.GIB   # an H200's memory as torch reports it (about 140 GiB)


def test_points_cover_every_length_configuration_and_shape_in_run_order():
    names = [name for name, _ in decode.points()]
    expected = {f"S{S}-bs{bs}-k{k}-h{Hq}x{Hkv}-B{B}" for S in (32768, 131072, 524288, 1048576)
                for bs, k in ((512, 3), (128, 8), (4096, 12)) for B, Hq, Hkv in ((1, 16, 16), (8, 32, 8))}
    assert len(names) == len(set(names)) == 24 and set(names) == expected
    assert "S131072-bs512-k3-h16x16-B1" in names and names[0].startswith("S32768-")
    order = [(params["B"], params["S"]) for _, params in decode.points()]
    assert order == sorted(order)                                           # B = 1 first, short ones first
    for name, params in decode.points():
        assert name == harness.point_name(S=params["S"], block_size=params["block_size"], top_k=params["top_k"],
                                          heads=(params["Hq"], params["Hkv"]), B=params["B"])
    goals = {(p["B"], p["Hq"], p["Hkv"], p["S"], p["block_size"], p["top_k"]) for _, p in decode.points()}
    assert set(decode.DECODE_GOALS) <= goals


def test_memory_plan_counts_the_dense_copy_and_the_pages_and_every_point_fits_an_h200():
    plan = decode.memory_plan(8, 8, 2**20, 4096)
    assert plan["dense_kv"] == 8 * 2**20 * 8 * 128 * 2 * 2 == 32 * harness.GIB
    assert plan["cache"] == plan["dense_kv"] + 8 * 256 * 8 * 128 * 4        # pages + float32 means
    assert plan["total"] == plan["dense_kv"] + plan["cache"] + decode.WORK_BYTES
    assert all(decode.memory_plan(p["B"], p["Hkv"], p["S"], p["block_size"])["total"]
               < decode.MEMORY_FRACTION * H200_BYTES for _, p in decode.points())


def test_build_cache_holds_the_keys_and_their_block_means():
    k, v = decode.dense_kv(2, 3, 100, "cpu", D=8, dtype=torch.float32)
    cache = decode.build_cache(k, v, 16, chunk=24)   # chunks that do not align with blocks
    assert cache.seqlens.tolist() == [100, 100]
    for b in range(2):
        kb, vb = cache.sequence(b)
        assert torch.equal(kb, k[b]) and torch.equal(vb, v[b])             # copies, not computations
        full = cache.page_table[b, :100 // 16].long()
        means = block_means(k[b:b + 1, :, :96], 16)[0].transpose(0, 1)       # [6, Hkv, D]
        assert torch.allclose(cache.means[full], means, atol=1e-6)


def distinct_pages(routed, S, block_size, Hkv):
    """pages_read by sets: the own block and routed blocks of every query head, per (sequence, kv head)."""
    B, _, Hq, _ = routed.shape
    g = Hq // Hkv
    pages = {(b, h // g, block) for b in range(B) for h in range(Hq)
             for block in [(S - 1) // block_size] + routed[b, 0, h].tolist() if block >= 0}
    return len(pages)


def test_pages_read_counts_distinct_pages_per_key_value_head():
    routed = torch.tensor([[[[0, 1], [1, 2], [-1, 0], [3, -1]]]], dtype=torch.int32)   # B 1, Hq 4, R 2
    assert decode.pages_read(routed, 40, 8, 2) == distinct_pages(routed, 40, 8, 2) == 4 + 3
    assert decode.pages_read(routed, 40, 8, 4) == distinct_pages(routed, 40, 8, 4) == 3 + 3 + 2 + 2
    gen = torch.Generator().manual_seed(0)
    routed = torch.randint(-1, 12, (3, 1, 8, 5), generator=gen, dtype=torch.int32)
    assert decode.pages_read(routed, 100, 8, 2) == distinct_pages(routed, 100, 8, 2)


def record(S, bs, k, B=1, Hq=16, Hkv=16, moba_ms=0.05, sdpa_ms=1.0, floor_ms=0.04, overhead_ms=0.02):
    r = {"shape": dict(B=B, Hq=Hq, Hkv=Hkv, S=S, D=128), "block_size": bs, "top_k": k, "moba_ms": moba_ms,
         "floor_ms": floor_ms, "over_floor": moba_ms / floor_ms, "step_overhead_ms": overhead_ms,
         "launch_bound": floor_ms < overhead_ms, "cudnn_ms": sdpa_ms, "flash_ms": None,
         "flash_skipped": "no kernel", "sdpa_ms": sdpa_ms, "speedup_vs_cudnn": sdpa_ms / moba_ms,
         "speedup_vs_sdpa": sdpa_ms / moba_ms}
    return {**r, **decode.verdicts(r)}


def test_verdicts_apply_the_goals():
    met = record(131072, 512, 3, moba_ms=0.1, sdpa_ms=0.9)                       # 9x >= 8x
    assert (met["goal_speedup_vs_sdpa"], met["goal_met"], met["floor_goal_met"]) == (8.0, True, False)
    missed = record(1048576, 4096, 12, moba_ms=0.2, sdpa_ms=2.0, floor_ms=0.15)  # 10x < 15x; 1.33x its floor
    assert (missed["goal_met"], missed["floor_goal_met"]) == (False, True)
    launch = record(32768, 512, 3, floor_ms=0.001)
    assert (launch["goal_speedup_vs_sdpa"], launch["goal_met"], launch["floor_goal_met"]) == (None, None, None)
    grouped = record(131072, 512, 3, B=8, Hq=32, Hkv=8)                          # goals are for B = 1, 16 heads
    assert grouped["goal_speedup_vs_sdpa"] is None


def test_plot_from_synthetic_json(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    for name, p in decode.points():
        S, bs, k, B, Hq, Hkv = (p[key] for key in ("S", "block_size", "top_k", "B", "Hq", "Hkv"))
        if (B, S) == (8, 1048576) and bs == 128:
            r = {"shape": dict(B=B, Hq=Hq, Hkv=Hkv, S=S, D=128), "block_size": bs, "top_k": k, "skipped": "memory"}
        else:
            r = record(S, bs, k, B, Hq, Hkv, moba_ms=0.02 + S * bs * k * 1e-13, sdpa_ms=S * B * 2e-6,
                       floor_ms=S * bs * k * 1e-13)
        harness.write_point(tmp_path, decode.DECODE, name, r)
    written = suites.plot_all(tmp_path)
    assert [p.name for p in written] == ["h200_decode.png"]
    width, height = Image.open(written[0]).size
    assert width > 1000 and height > 400


def test_a_tiny_point_measured_under_the_interpreter(tmp_path, monkeypatch):
    """measure() end to end on the CPU (Triton interpreter), do_bench replaced by a wall-clock median:
    SDPA's cuDNN backend has no CPU kernel, so it is recorded as skipped, not crashed."""
    def wall_ms(fn):
        times = []
        for _ in range(2):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    monkeypatch.setattr(decode, "DEVICE", "cpu")
    monkeypatch.setattr(decode, "do_bench_ms", wall_ms)
    monkeypatch.setattr(decode, "cuda_peak_bytes", lambda fn: 0)
    monkeypatch.setattr(decode, "usable_bytes", lambda: 8 * harness.GIB)
    monkeypatch.setattr(decode, "ceilings", lambda out: {"copy_bytes_per_s": 1e11, "bf16_flops_per_s": 1e12})
    monkeypatch.setattr(decode, "_shape", {})
    params = dict(B=2, Hq=4, Hkv=2, S=48, block_size=8, top_k=3)
    r = decode.measure(params, tmp_path)
    assert r["moba_ms"] > 0 and r["step_overhead_ms"] > 0 and r["flash_ms"] > 0
    assert r["cudnn_ms"] is None and r["cudnn_skipped"] and "speedup_vs_cudnn" not in r
    assert r["speedup_vs_sdpa"] == r["speedup_vs_flash"] == r["flash_ms"] / r["moba_ms"]
    counted = decode.decode_bytes(48, 2, 8, 3)
    assert r["bytes"] == {key: 2 * n for key, n in counted.items()}
    page = 8 * 2 * 128 * 2
    assert 2 * 2 * 3 <= r["pages_read"] <= 2 * 2 * (1 + 2 * 2)       # each kv head: 3 pages if its 2 query heads agree
    assert r["bytes_read"] == r["bytes"]["moba_means"] + r["pages_read"] * page
    assert r["floor_ms"] == pytest.approx(1e3 * r["bytes_read"] / 1e11)
    assert (r["goal_speedup_vs_sdpa"], r["goal_met"]) == (None, None)
    assert r["over_floor"] == r["moba_ms"] / r["floor_ms"]
    json.dumps(r)                                                     # a JSON record


def test_a_point_that_does_not_fit_is_skipped_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "usable_bytes", lambda: 16 * harness.GIB)
    r = decode.measure(dict(B=8, Hq=32, Hkv=8, S=1048576, block_size=512, top_k=3), tmp_path)
    assert "not measured" in r["skipped"] and r["memory_plan"]["total"] > r["usable_bytes"]
    assert "moba_ms" not in r


def test_the_cache_a_point_measures_decodes_as_the_torch_rung():
    """The cache build_cache makes, read by the Triton rung (interpreter) and the torch rung."""
    import moba_edu as me

    k, v = decode.dense_kv(1, 2, 64, "cpu", dtype=torch.float32)
    cache = decode.build_cache(k, v, 8, chunk=40)
    q = torch.randn(1, 4, 1, 128)
    o = me.moba_decode(q, cache, top_k=3, impl="triton")
    assert rel_err(o, me.moba_decode(q, cache, top_k=3, impl="torch")) < 1e-5
