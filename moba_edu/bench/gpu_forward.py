"""GPU suites of the MoBA forward: bf16, B = 1, head dim 128, causal; times are do_bench medians.

dense_sdpa      dense causal SDPA, cuDNN and FlashAttention-2 backends, S = 8K ... 1M (past 128K: cuDNN alone,
                a few CUDA-event calls), 16 heads and 32 query / 8 key-value heads.
moba_fwd        the Triton MoBA forward (impl="triton") and its router alone, S = 8K ... 1M,
                (block_size, top_k) in (512, 3), (128, 8), (4096, 12), and grouped heads at 32K and 128K;
                density, density bound, router floor, peak and extra memory, speed-ups over cuDNN,
                FlashAttention-2 and (up to 32K) the torch rung. Measures the ceilings (floors.py) and
                the `dense_sdpa` point it needs where they are missing from the output folder.
moba_fwd_tiles  tile sizes, warps and stages of the routed, own-block and router kernels at a few shapes each
                (TILE_SWEEPS: how launch_config was chosen).
moba_fwd_hdim   the forward and its router at head dims 192 and 256 (S = 32K and 128K, (512, 3), 16
                heads) against dense causal SDPA at the same head dim; a backend that does not take a
                head dim is recorded as `<backend>_error` (torch's FlashAttention-2 takes up to 256;
                cuDNN up to 256 on Hopper from cuDNN 9.10, else 128).
FlexAttention is left out: compiling a per-token block mask per shape costs minutes of a GPU lease.

The forward goals of the project (`FORWARD_GOALS`): at least 5x faster than cuDNN's dense causal
attention at 32K tokens and 20x at 128K with (512, 3), 6x at 1M with (4096, 12); the router within 2x
of its floor.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import cost
from .floors import ceilings, floor_ms
from .harness import (GIB, GPU_HEAD_DIM, Suite, cuda_peak_bytes, do_bench_ms, event_ms, gpu_ms, moba_point,
                      point_name, qkv, read_point, register, sdpa_backends, write_point)

SEQ_LENS = [8192, 32768, 131072, 524288, 1048576]
CONFIGS = [(512, 3), (128, 8), (4096, 12)]        # (block_size, top_k)
HEADS, GROUPED = (16, 16), (32, 8)                 # (Hq, Hkv)
GROUPED_SEQ_LENS = [32768, 131072]
# The moba_fwd_hdim suite (and moba_bwd_hdim): the head dims past 128; D = 128 is moba_fwd's own point.
HEAD_DIMS, HEAD_DIM_SEQ_LENS = (192, 256), (32768, 131072)
TORCH_RUNG_MAX_S = 32768
EVENT_TIMED_S = 131072   # past this, dense attention takes seconds: a few CUDA-event calls, not do_bench
# (S, block_size, top_k) -> the least speed-up over cuDNN's dense causal attention the project aims for.
FORWARD_GOALS = {(131072, 512, 3): 20.0, (32768, 512, 3): 5.0, (1048576, 4096, 12): 6.0}
ROUTER_FLOOR_GOAL = 2.0   # router time within 2x of its floor


def dense_points() -> list[tuple[str, dict]]:
    shapes = [(S, *HEADS) for S in SEQ_LENS] + [(S, *GROUPED) for S in GROUPED_SEQ_LENS]
    return [(point_name(S=S, heads=(Hq, Hkv)), dict(S=S, Hq=Hq, Hkv=Hkv)) for S, Hq, Hkv in shapes]


def measure_dense(params: dict, out_dir: Path) -> dict:
    """Dense causal SDPA, bf16: cuDNN and FlashAttention-2 backends (cuDNN alone past EVENT_TIMED_S).
    Grouped heads are timed on repeated k, v: the same FLOPs as a grouped kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    S, Hq, Hkv = params["S"], params["Hq"], params["Hkv"]
    q, k, v = qkv(S, Hq, Hkv)
    k, v = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    record = {"shape": dict(B=1, Hq=Hq, Hkv=Hkv, S=S, D=GPU_HEAD_DIM), "dtype": "bfloat16",
              "flops": 2 * Hq * S * S * GPU_HEAD_DIM,
              "timing": "do_bench median" if S <= EVENT_TIMED_S else "CUDA events, median of 2 after 1 warm-up"}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        if name == "flash" and S > EVENT_TIMED_S:
            continue
        with sdpa_kernel(backend):
            call = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
            record[f"{name}_ms"] = event_ms(call) if S > EVENT_TIMED_S else do_bench_ms(call)
    return record


DENSE = register(Suite("dense_sdpa", "gpu", dense_points, measure_dense))


def dense(S: int, Hq: int, Hkv: int, out_dir: Path) -> dict:
    """The dense_sdpa point of this shape, measured (and written) first where it is missing."""
    point = point_name(S=S, heads=(Hq, Hkv))
    if read_point(out_dir, DENSE, point) is None:
        write_point(out_dir, DENSE, point, measure_dense(dict(S=S, Hq=Hq, Hkv=Hkv), out_dir))
    return read_point(out_dir, DENSE, point)


def moba_points() -> list[tuple[str, dict]]:
    shapes = [(S, *HEADS, bs, k) for S in SEQ_LENS for bs, k in CONFIGS]
    shapes += [(S, *GROUPED, 512, 3) for S in GROUPED_SEQ_LENS]
    shapes.sort(key=lambda shape: shape[0])   # by length: a run cut short keeps the short ones
    return [moba_point(*shape) for shape in shapes]


def measure_moba(params: dict, out_dir: Path) -> dict:
    """The Triton forward (impl="triton", no grad) and its router alone; floors from measured rates."""
    import moba_edu as me
    from moba_edu import efficient
    from moba_edu.kernels import router
    from moba_edu.kernels.layout import default_partial_budget, layout, tiles_per_chunk
    from moba_edu.kernels.moba_fwd import moba_forward

    ceil = ceilings(out_dir)
    S, Hq, Hkv, bs, top_k = (params[key] for key in ("S", "Hq", "Hkv", "block_size", "top_k"))
    dense_record = dense(S, Hq, Hkv, out_dir)
    q, k, v = qkv(S, Hq, Hkv)
    D, scale = GPU_HEAD_DIM, GPU_HEAD_DIM ** -0.5
    lay = layout((S,), bs, q.device, True)
    call = lambda: me.moba_attention(q, k, v, block_size=bs, top_k=top_k, impl="triton")  # noqa: E731
    with torch.inference_mode():
        # As moba_forward runs them: the router also counts the pairs, the schedule fills the buckets.
        chunk_tiles = tiles_per_chunk(lay, Hq, lay.routed_slots(top_k), D, 2, default_partial_budget(q))
        counts = router.pair_counts(lay, Hq, chunk_tiles, q.device)

        def route():
            counts.zero_()
            return router.packed_route(q, router.block_means(k, lay), lay, top_k, counts, chunk_tiles)

        router_ms = do_bench_ms(route)
        routed = route()
        schedule_ms = do_bench_ms(lambda: router.schedule(routed, lay, chunk_tiles, counts))
        del routed, counts
        moba_ms = do_bench_ms(call)
        peak = cuda_peak_bytes(call)
        _, _, sched = moba_forward(q, k, v, (S,), bs, top_k, scale)
        counts = cost.routed_pair_counts(sched.routed, S, bs)
        n_chunks, R = sched.n_chunks, sched.R
        del sched
        torch_rung_ms = None
        if S <= TORCH_RUNG_MAX_S and counts["routed_blocks"] * bs * 8 < 40 * 10**9:  # its [rows, block] tiles fit
            torch_rung_ms = do_bench_ms(lambda: efficient.moba_attention(q, k, v, bs, top_k, scale))
    router_work = cost.router_cost(Hq, Hkv, S, D, R, counts["eligible_blocks"])
    router_floor_ms = floor_ms(ceil, nbytes=router_work["bytes"], flops=router_work["flops"], rate="fp32")
    record = {"shape": dict(B=1, Hq=Hq, Hkv=Hkv, S=S, D=D), "dtype": "bfloat16", "block_size": bs, "top_k": top_k,
              **counts, "moba_ms": moba_ms, "router_ms": router_ms, "schedule_ms": schedule_ms,
              "attention_ms": moba_ms - router_ms - schedule_ms,
              "moba_tflops_per_s": 4 * D * counts["attended_pairs"] / moba_ms / 1e9,
              "router_bytes": router_work["bytes"], "router_flops": router_work["flops"],
              "router_floor_ms": router_floor_ms, "router_over_floor": router_ms / router_floor_ms,
              "peak_bytes": peak, "extra_bytes": peak - 2 * q.numel(),
              "qkvo_bytes": 2 * (2 * q.numel() + 2 * k.numel()), "n_chunks": n_chunks, "torch_rung_ms": torch_rung_ms,
              "cudnn_ms": dense_record["cudnn_ms"], "flash_ms": dense_record.get("flash_ms"),
              "density_bound_ms": dense_record["cudnn_ms"] * counts["density"], "ceilings": ceil}
    for name in ("cudnn", "flash", "torch_rung"):
        if record[f"{name}_ms"] is not None:
            record[f"speedup_vs_{name}"] = record[f"{name}_ms"] / moba_ms
    record["target_speedup_vs_cudnn"] = FORWARD_GOALS.get((S, bs, top_k)) if Hq == Hkv else None
    print(f"  moba {moba_ms:.4g} ms (router {router_ms:.3g} ms, {record['router_over_floor']:.3g}x its floor, "
          f"schedule {schedule_ms:.3g} ms), cuDNN {dense_record['cudnn_ms']:.4g} ms: "
          f"{record['speedup_vs_cudnn']:.3g}x (density bound {1 / counts['density']:.3g}x), "
          f"extra memory {record['extra_bytes'] / GIB:.3g} GiB", flush=True)
    return record


def plot_moba(records: list[dict], out_dir: Path) -> list[Path]:
    """Speed-up over cuDNN against S per (block_size, top_k) with its density bound and the goals;
    the router's time over its floor."""
    import matplotlib.pyplot as plt

    from .plots import gpu_title, plain_log_y, s_axes, save

    fig, (ax_speed, ax_router) = plt.subplots(1, 2, figsize=(13, 4.8))
    configs = sorted({(r["block_size"], r["top_k"], r["shape"]["Hq"], r["shape"]["Hkv"]) for r in records})
    for i, (bs, k, hq, hkv) in enumerate(configs):
        runs = sorted((r for r in records if (r["block_size"], r["top_k"], r["shape"]["Hq"], r["shape"]["Hkv"])
                       == (bs, k, hq, hkv)), key=lambda r: r["shape"]["S"])
        S = [r["shape"]["S"] for r in runs]
        label = f"({bs}, {k})" + ("" if hq == hkv else f", {hq}q/{hkv}kv heads")
        ax_speed.plot(S, [r["speedup_vs_cudnn"] for r in runs], marker="o", color=f"C{i}", label=f"MoBA {label}")
        ax_speed.plot(S, [1 / r["density"] for r in runs], ls=":", color=f"C{i}", label=f"density bound {label}")
        ax_router.plot(S, [r["router_over_floor"] for r in runs], marker="o", color=f"C{i}", label=label)
    for (S, bs, k), goal in FORWARD_GOALS.items():
        ax_speed.plot([S], [goal], marker="*", ms=13, color="k", ls="none")
        ax_speed.annotate(f"target {goal:g}x ({bs}, {k})", (S, goal), textcoords="offset points", xytext=(6, -10),
                          fontsize=7)
    ax_speed.set(ylabel="speed-up over cuDNN dense causal (x)", yscale="log",
                 title="MoBA forward vs dense causal attention (cuDNN)")
    plain_log_y(ax_speed, [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500])
    ax_router.axhline(ROUTER_FLOOR_GOAL, color="k", ls="--", lw=1, label="target: 2x the floor")
    ax_router.set(ylabel="router time / its floor (x)", ylim=(0, None),
                  title="the router: how far from the fastest it could be")
    s_axes(ax_speed, ax_router)
    fig.suptitle(gpu_title(records, "Triton MoBA forward"), fontsize=10)
    fig.text(0.53, 0.015, "the router's floor: the time to read q and k and write its choices at full memory speed, or\n"
             "to compute every gate at full float32 speed, whichever is longer (rates measured on this GPU)", fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save(fig, out_dir / "gpu_moba_forward.png")


register(Suite("moba_fwd", "gpu", moba_points, measure_moba, plot_moba))


# Tile sweeps: kernel -> [(tiles (BLOCK_M, BLOCK_N, warps, stages), shapes (S, block_size, top_k)), ...]. The
# own-block and router kernels' BLOCK_M is the layout's query tile (64).
TILE_SWEEPS = {
    "routed": [([(128, 64, 8, 3), (64, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 64, 4, 3)],
                [(131072, 512, 3), (32768, 4096, 12)]),
               ([(128, 64, 8, 3), (64, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 2),
                 (64, 128, 4, 2), (128, 64, 8, 2)],
                [(131072, 128, 8), (32768, 512, 3)])],
    "own": [([(64, 64, 8, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (64, 32, 4, 3), (64, 128, 8, 2),
              (64, 32, 8, 2)],
             [(131072, 512, 3), (131072, 128, 8), (131072, 4096, 12), (32768, 512, 3)])],
    "router": [([(64, 64, 4, 2), (64, 32, 4, 2), (64, 32, 4, 3), (64, 128, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2)],
                [(131072, 128, 8), (524288, 128, 8), (131072, 512, 3)])],
}


def tile_points() -> list[tuple[str, dict]]:
    """Each kernel's tiles at its shapes (TILE_SWEEPS); the routed kernel's points carry no kernel word."""
    return [(point_name(None if kernel == "routed" else kernel, S=S, block_size=bs, top_k=k, tile=tile),
             dict(kernel=kernel, S=S, block_size=bs, top_k=k, tile=tile))
            for kernel, groups in TILE_SWEEPS.items() for tiles, shapes in groups for S, bs, k in shapes
            for tile in tiles]


def measure_tiles(params: dict, out_dir: Path) -> dict:
    """The whole forward with one kernel's tile changed (routed, own), or the router alone (router)."""
    from moba_edu.kernels import router
    from moba_edu.kernels.layout import layout
    from moba_edu.kernels.moba_fwd import launch_config, moba_forward

    kernel, S, bs, top_k, (m, n, w, st) = (params[key] for key in ("kernel", "S", "block_size", "top_k", "tile"))
    q, k, v = qkv(S, *HEADS)
    tile = dict(BLOCK_N=n, num_warps=w, num_stages=st)
    with torch.inference_mode():
        if kernel == "router":
            lay = layout((S,), bs, q.device, True)
            ms = do_bench_ms(lambda: router.packed_route(q, router.block_means(k, lay), lay, top_k, config=tile))
        else:
            config = dict(launch_config(GPU_HEAD_DIM), **{kernel: dict(tile, BLOCK_M=m) if kernel == "routed" else tile})
            ms = do_bench_ms(lambda: moba_forward(q, k, v, (S,), bs, top_k, GPU_HEAD_DIM ** -0.5, config=config))
    print(f"  {kernel} tile {params['tile']}: {ms:.4g} ms", flush=True)
    return {"shape": dict(B=1, Hq=HEADS[0], Hkv=HEADS[1], S=S, D=GPU_HEAD_DIM), "block_size": bs, "top_k": top_k,
            "kernel": kernel, "tile": dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st),
            ("router_ms" if kernel == "router" else "moba_ms"): ms}


register(Suite("moba_fwd_tiles", "gpu", tile_points, measure_tiles))


def head_dim_points() -> list[tuple[str, dict]]:
    """(512, 3), 16 heads, S in HEAD_DIM_SEQ_LENS, each of HEAD_DIMS (shared with gpu_backward's suite)."""
    return [(point_name(S=S, block_size=512, top_k=3, heads=HEADS, head_dim=D),
             dict(S=S, Hq=HEADS[0], Hkv=HEADS[1], block_size=512, top_k=3, D=D))
            for S in HEAD_DIM_SEQ_LENS for D in HEAD_DIMS]


def measure_head_dim(params: dict, out_dir: Path) -> dict:
    """The Triton forward (no grad) and its router at one head dim, and dense causal SDPA at that head dim."""
    import moba_edu as me
    from moba_edu.kernels import moba_fwd, router
    from moba_edu.kernels.layout import layout

    S, Hq, Hkv, bs, top_k, D = (params[key] for key in ("S", "Hq", "Hkv", "block_size", "top_k", "D"))
    q, k, v = qkv(S, Hq, Hkv, head_dim=D)
    lay = layout((S,), bs, q.device, True)
    with torch.inference_mode():
        router_ms = do_bench_ms(lambda: router.packed_route(q, router.block_means(k, lay), lay, top_k))
        counts = cost.routed_pair_counts(router.packed_route(q, router.block_means(k, lay), lay, top_k), S, bs)
        moba_ms = do_bench_ms(lambda: me.moba_attention(q, k, v, block_size=bs, top_k=top_k, impl="triton"))
        dense_record = sdpa_backends(lambda: {"ms": gpu_ms(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))})
    record = {"shape": dict(B=1, Hq=Hq, Hkv=Hkv, S=S, D=D), "dtype": "bfloat16", "block_size": bs, "top_k": top_k,
              "density": counts["density"], "moba_ms": moba_ms, "router_ms": router_ms,
              "moba_tflops_per_s": 4 * D * counts["attended_pairs"] / moba_ms / 1e9,
              "launch_config": dict(moba_fwd.launch_config(D), router=router.launch_config(D)), **dense_record}
    for name in ("cudnn", "flash"):
        if f"{name}_ms" in record:
            record[f"speedup_vs_{name}"] = record[f"{name}_ms"] / moba_ms
    print(f"  D={D}: moba {moba_ms:.4g} ms (router {router_ms:.3g} ms), "
          + ", ".join(f"{n} {record.get(f'{n}_ms', 'n/a')}" for n in ("cudnn", "flash")), flush=True)
    return record


register(Suite("moba_fwd_hdim", "gpu", head_dim_points, measure_head_dim))
