"""Benchmarks (DESIGN.md §6): `python -m moba_edu.bench --cpu|--gpu [--only NAME ...] [--out DIR]`.

A *suite* is a named list of points measured on one kind of device (`SUITES["cpu"]`, `SUITES["gpu"]`).
Each point is written as one JSON file as soon as it is measured, under <out>/<device dir>/ (cpu/ or
h200/), so a long run can be split with `--only` (fnmatch patterns over "suite" or "suite/point",
e.g. `--only "torch_vs_naive/naive-*"`) or interrupted without losing what it measured. Every JSON
holds absolute times, versions, the machine, shapes, block_size, top_k, density, peak memory and
ratios. `plot_all(out_dir)` re-draws every figure from the JSON without measuring (`make figures`).

CPU suites
  torch_vs_naive  the naive (dense mask) and torch (efficient) rungs, forward pass, S = 1K ... 32K,
                  4 heads, head dim 64, block 256, top_k 3, float32, one thread. Time: median of
                  repeats. Memory: peak RSS of a fresh subprocess per point, minus its RSS before the
                  call (`peak_rss_bytes` says why that is VmHWM rather than ru_maxrss on Linux).
GPU suites (bf16, B = 1, head dim 128, causal; times are medians of triton.testing.do_bench)
  ceilings        the measured copy bandwidth and bf16 / float32 matrix rates (the floors' rates).
  dense_sdpa      dense causal SDPA, cuDNN and FlashAttention-2 backends, S = 8K ... 1M (1M: cuDNN
                  alone, a few CUDA-event calls), 16 heads and 32 query / 8 key-value heads.
  moba_fwd        the Triton MoBA forward (impl="triton") and its router alone, S = 8K ... 1M,
                  (block_size, top_k) in (512, 3), (128, 8), (4096, 12), and grouped heads at 32K
                  and 128K; density, density bound, router floor, peak and extra memory, speed-ups over
                  cuDNN, FlashAttention-2 and (up to 32K) the torch rung. Measures `ceilings` and the
                  `dense_sdpa` point it needs when they are missing from --out.
  moba_fwd_tiles  the routed kernel's tile sizes, warps and stages at two shapes (how they were chosen).
  FlexAttention is left out: compiling a per-token block mask per shape costs minutes of a GPU lease.
GPU suites: bench_backward.py's (moba_fwd_bwd: MoBA forward + backward against SDPA; bwd_tiles).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import bench_backward
from .environment import triton_version
from .routing import num_blocks

BENCH_DIR = Path(__file__).resolve().parent.parent / "figures" / "bench"
DEVICE_DIRS = {"cpu": "cpu", "gpu": "h200"}
GIB = 2**30


# ---------------------------------------------------------------- common helpers

@dataclass
class Suite:
    """points: [(point name, params)]; measure(params, out_dir) -> record (without the common fields;
    out_dir holds the points measured so far, for ratios); plot(records, out_dir) -> written figure
    paths (records: every JSON of the suite)."""

    name: str
    device: str
    points: Callable[[], list[tuple[str, dict]]]
    measure: Callable[[dict, Path], dict]
    plot: Callable[[list[dict], Path], list[Path]]


def machine() -> dict:
    """Versions and the machine: CPU times are only comparable on one machine, so record it."""
    info = {"torch": torch.__version__, "triton": triton_version(), "python": platform.python_version(),
            "os": f"{platform.system()} {platform.machine()}", "cpu": _cpu_name(), "logical_cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def point_path(out_dir: Path, suite: Suite, point: str) -> Path:
    return out_dir / DEVICE_DIRS[suite.device] / f"{suite.name}-{point}.json"


def write_point(out_dir: Path, suite: Suite, point: str, record: dict) -> Path:
    """One JSON per point, with the common fields (suite, point, device, machine, date)."""
    path = point_path(out_dir, suite, point)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"suite": suite.name, "point": point, "device": suite.device, "machine": machine(),
              "date": time.strftime("%Y-%m-%d"), **record}
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def read_points(out_dir: Path, suite: Suite) -> list[dict]:
    folder = out_dir / DEVICE_DIRS[suite.device]
    return [json.loads(p.read_text()) for p in sorted(folder.glob(f"{suite.name}-*.json"))]


def _proc_status_bytes(field: str) -> int | None:
    """A memory line (VmRSS, VmHWM) of /proc/self/status in bytes; None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Resident memory now (Linux), else the peak so far."""
    return _proc_status_bytes("VmRSS") or peak_rss_bytes()


def reset_peak_rss() -> None:
    """Linux: restart the peak (VmHWM) from the current RSS, so the next peak is the call's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """Peak resident memory of this process.

    On Linux, VmHWM of /proc/self/status: ru_maxrss would do in a process started from scratch, but a
    subprocess is forked from this one before it execs Python anew, and Linux carries the parent's
    resident size over into the child's ru_maxrss. Elsewhere ru_maxrss (KiB on Linux, bytes on macOS).
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return _proc_status_bytes("VmHWM") or (peak if sys.platform == "darwin" else peak * 1024)


def timed_runs(fn: Callable[[], object], min_repeats: int = 3, min_seconds: float = 2.0,
               max_repeats: int = 15) -> list[float]:
    """Wall times of fn() after one warm-up call: at least min_repeats runs and about min_seconds."""
    fn()
    times = []
    while len(times) < max_repeats and (len(times) < min_repeats or sum(times) < min_seconds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def in_fresh_process(params: dict) -> dict:
    """Run `_child_measure(params)` in a new Python process, so that its peak memory is this point's alone."""
    done = subprocess.run([sys.executable, "-m", "moba_edu.bench", "--child", json.dumps(params)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child_measure(params: dict) -> dict:
    """Inside the fresh process: make inputs, note the RSS, time the forward pass, note the peak."""
    import moba_edu as me

    torch.set_num_threads(params["threads"])
    torch.manual_seed(0)
    B, Hq, Hkv, S, D = (params[key] for key in ("B", "Hq", "Hkv", "S", "D"))
    q = torch.randn(B, Hq, S, D)
    k, v = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    reset_peak_rss()
    base = rss_bytes()
    call = lambda: me.moba_attention(q, k, v, block_size=params["block_size"], top_k=params["top_k"],  # noqa: E731
                                     impl=params["impl"])
    with torch.inference_mode():
        times = timed_runs(call)
    return {"times_s": times, "base_rss_bytes": base, "peak_rss_bytes": peak_rss_bytes(),
            "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------- CPU: torch rung vs naive rung

# One thread: the CPU is shared with other work, and idle OpenMP threads of a busy machine slow many
# small ops (the torch rung) far more than a few large ones (naive). Ratios are per core.
CPU_CONFIG = dict(B=1, Hq=4, Hkv=4, D=64, block_size=256, top_k=3, threads=1)
CPU_SEQ_LENS = [1024, 2048, 4096, 8192, 16384, 32768]
NAIVE_LIMIT_BYTES = 8 * GIB
SPEEDUP_TARGET = (8192, 5.0)  # at S = 8192 the torch rung should be >= 5x faster than naive
MEMORY_TOLERANCE = 2.0  # measured extra memory within [1/2, 2] x the formula


def naive_bytes(B, Hq, S, **_) -> int:
    """Peak extra memory of the naive rung's forward: 13 bytes per (head, query, key), float32.

    Alive together at its peak: the bool token mask (1 byte), the masked scores (4), scores minus
    their log-sum-exp (4) and its exponential (4).
    """
    return 13 * B * Hq * S * S


TORCH_FORMULA = ("4 B x [(block_size + 5 D) x rows + (2 Hq top_k + 4 Hkv) x B S D], "
                 "rows = Hq B S (top_k - 1) + Hkv B N block_size / 2")


def torch_bytes(B, Hq, Hkv, S, D, block_size, top_k) -> int:
    """Peak extra memory of the torch rung's forward (float32), reached in its routed step (top_k >= 2).

    `rows` query rows go through routed tiles: one per selection (Hq B S (top_k - 1), a little less
    since early queries have fewer eligible blocks) plus half a tile of padding per (kv head, block).
    Per row, alive at once: one row of scores/probabilities (block_size floats), the gathered query,
    key and value rows, and the tile output before and after normalisation (5 D floats; a tile has
    as many rows as keys). Besides: the partial outputs [T, Hq, top_k - 1, D] (zeros and filled),
    the own-block output, the packed copies of q, k, v and the key/value blocks gathered from them:
    (2 Hq top_k + 4 Hkv) B S D floats.
    The router's gate chunks (<= efficient.GATE_BUDGET floats) are freed before attention starts.
    """
    N = num_blocks(S, block_size)
    rows = Hq * B * S * (top_k - 1) + Hkv * B * N * block_size / 2
    return int(4 * ((block_size + 5 * D) * rows + (2 * Hq * top_k + 4 * Hkv) * B * S * D))


def _torch_vs_naive_points() -> list[tuple[str, dict]]:
    return [(f"{impl}-S{S}", dict(CPU_CONFIG, S=S, impl=impl)) for S in CPU_SEQ_LENS for impl in ("naive", "torch")]


def _measure_torch_vs_naive(params: dict, out_dir: Path) -> dict:
    from .viz.cost import density

    S, impl = params["S"], params["impl"]
    predict = naive_bytes if impl == "naive" else torch_bytes
    predicted = predict(**{key: params[key] for key in ("B", "Hq", "Hkv", "S", "D", "block_size", "top_k")})
    record = {"impl": impl, "shape": {key: params[key] for key in ("B", "Hq", "Hkv", "S", "D")},
              "dtype": "float32", "block_size": params["block_size"], "top_k": params["top_k"],
              "density": density(S, params["block_size"], params["top_k"]), "pass": "forward (inference_mode)",
              "memory_formula": "13 B Hq S^2 bytes" if impl == "naive" else TORCH_FORMULA,
              "predicted_extra_bytes": predicted}
    if impl == "naive" and predicted > NAIVE_LIMIT_BYTES:
        return {**record, "skipped": f"predicted peak {predicted / GIB:.1f} GiB > {NAIVE_LIMIT_BYTES / GIB:.0f} GiB"}
    measured = in_fresh_process(params)
    extra = measured["peak_rss_bytes"] - measured["base_rss_bytes"]
    record = {**record, **measured, "median_s": statistics.median(measured["times_s"]), "extra_bytes": extra,
              "measured_over_predicted": extra / predicted}
    naive = point_path(out_dir, SUITES["cpu"]["torch_vs_naive"], f"naive-S{S}")
    if impl == "torch" and naive.exists() and "median_s" in (naive_record := json.loads(naive.read_text())):
        record["speedup_vs_naive"] = naive_record["median_s"] / record["median_s"]
    return record


def _plot_torch_vs_naive(records: list[dict], out_dir: Path) -> list[Path]:
    """Three panels against S: speed-up of torch over naive, peak extra memory (measured and formula),
    and the torch rung's measured / predicted memory."""
    import matplotlib.pyplot as plt

    runs = {impl: sorted((r for r in records if r["impl"] == impl), key=lambda r: r["shape"]["S"])
            for impl in ("naive", "torch")}
    timed = {impl: {r["shape"]["S"]: r for r in rs if "median_s" in r} for impl, rs in runs.items()}
    fig, (ax_speed, ax_mem, ax_ratio) = plt.subplots(1, 3, figsize=(15, 4.6))

    both = sorted(set(timed["naive"]) & set(timed["torch"]))
    speedups = [timed["naive"][S]["median_s"] / timed["torch"][S]["median_s"] for S in both]
    ax_speed.plot(both, speedups, marker="o", label="naive time / torch time (medians)")
    for S, ratio in zip(both, speedups):
        ax_speed.annotate(f"{ratio:.3g}x", (S, ratio), textcoords="offset points", xytext=(0, 6), ha="center",
                          fontsize=8)
    for r in runs["naive"]:
        if "skipped" in r:  # keep the S axis whole, and say why there is no ratio
            ax_speed.axvline(r["shape"]["S"], color="0.9", lw=10, zorder=0)
            ax_speed.text(r["shape"]["S"], 0.5, f"naive not run: needs {r['predicted_extra_bytes'] / GIB:.3g} GiB",
                          rotation=90, ha="center", va="bottom", fontsize=7)
    S_target, target = SPEEDUP_TARGET
    ax_speed.plot([S_target], [target], marker="*", ms=12, color="k", ls="none", label=f"target: {target:g}x at S={S_target}")
    ax_speed.set(ylabel="speed-up of the torch rung (x)", title="speed-up on one core",
                 ylim=(0, 1.15 * max(speedups + [target])))

    for impl, color in (("naive", "C3"), ("torch", "C0")):
        ran = [r for r in runs[impl] if "extra_bytes" in r]
        ax_mem.plot([r["shape"]["S"] for r in ran], [r["extra_bytes"] / GIB for r in ran], marker="o", color=color,
                    label=f"{impl}: measured")
        ax_mem.plot([r["shape"]["S"] for r in runs[impl]], [r["predicted_extra_bytes"] / GIB for r in runs[impl]],
                    ls="--", color=color, label=f"{impl}: formula")
        for r in runs[impl]:
            if "skipped" in r:
                need = r["predicted_extra_bytes"] / GIB
                ax_mem.plot(r["shape"]["S"], need, marker="o", mfc="none", color=color)
                ax_mem.annotate(f"not run: would need {need:.3g} GiB", (r["shape"]["S"], need),
                                textcoords="offset points", xytext=(-6, -3), ha="right", fontsize=7)
    ax_mem.axhline(NAIVE_LIMIT_BYTES / GIB, color="0.5", ls=":", lw=1, label="8 GiB (naive skipped above)")
    ax_mem.set(ylabel="peak RSS - RSS before the call (GiB)", yscale="log", title="peak extra memory")

    measured = [r for r in runs["torch"] if "measured_over_predicted" in r]
    ax_ratio.plot([r["shape"]["S"] for r in measured], [r["measured_over_predicted"] for r in measured], marker="o",
                  label="torch: measured / formula")
    ax_ratio.axhspan(1 / MEMORY_TOLERANCE, MEMORY_TOLERANCE, color="C2", alpha=0.12, label="within 2x")
    ax_ratio.set(ylabel="measured / predicted extra memory", yscale="log", ylim=(0.25, 4), title="memory formula check")
    ax_ratio.set_yticks([0.25, 0.5, 1, 2, 4], ["0.25", "0.5", "1", "2", "4"])
    ax_ratio.set_yticks([], minor=True)

    for ax in (ax_speed, ax_mem, ax_ratio):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length S (tokens)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right" if ax is ax_mem else "upper left")
    first = (measured or records)[0]
    shape = first["shape"]
    fig.suptitle(f"CPU forward, float32: torch rung vs naive rung (B={shape['B']}, Hq={shape['Hq']}, D={shape['D']}, "
                 f"block_size={first['block_size']}, top_k={first['top_k']}) on {first['machine']['cpu']}, "
                 f"{first.get('torch_threads', '?')} thread(s)", fontsize=10)
    fig.text(0.01, 0.01, f"formulas (bytes): naive 13 B Hq S²;  torch {TORCH_FORMULA}", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = out_dir / "cpu_torch_vs_naive.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]

# ---------------------------------------------------------------- GPU: the Triton MoBA forward vs dense SDPA

GPU_SEQ_LENS = [8192, 32768, 131072, 1048576]
GPU_CONFIGS = [(512, 3), (128, 8), (4096, 12)]        # (block_size, top_k)
GPU_HEADS, GPU_GROUPED, GPU_HEAD_DIM = (16, 16), (32, 8), 128
GPU_GROUPED_SEQ_LENS = [32768, 131072]
TORCH_RUNG_MAX_S = 32768
EVENT_TIMED_S = 131072   # past this, dense attention takes seconds: a few CUDA-event calls, not do_bench
# Issue 4's targets: (S, block_size, top_k) -> least speed-up over cuDNN's dense causal attention.
GPU_TARGETS = {(131072, 512, 3): 20.0, (32768, 512, 3): 5.0, (1048576, 4096, 12): 6.0}
ROUTER_FLOOR_TARGET = 2.0   # router time within 2x of its floor


def bench_ms(fn: Callable[[], object]) -> float:
    """Median of `triton.testing.do_bench` (CUDA events; compile and warm-up excluded)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def event_ms(fn: Callable[[], object], calls: int = 2) -> float:
    """Median of a few CUDA-event timed calls after one warm-up: for calls of seconds."""
    fn()
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _gpu_qkv(S: int, Hq: int, Hkv: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda h: torch.randn(1, h, S, GPU_HEAD_DIM, device="cuda", generator=gen).bfloat16()  # noqa: E731
    return make(Hq), make(Hkv), make(Hkv)


def _measure_ceilings(params: dict, out_dir: Path) -> dict:
    """METHOD.md's two rates, measured: copy bandwidth (bytes read + written, 1 GiB bf16 copy), and the
    bf16 tensor-core and float32 (FMA, TF32 off) matrix rates of 8192^3 products."""
    x = torch.randn(GIB // 2, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    copy_ms = bench_ms(lambda: y.copy_(x))
    del x, y
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    bf16_ms = bench_ms(lambda: a @ b)
    a, b = a.float(), b.float()
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    fp32_ms = bench_ms(lambda: a @ b)
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return {"copy_bytes_per_s": 2 * GIB / copy_ms * 1e3, "bf16_flops_per_s": 2 * n**3 / bf16_ms * 1e3,
            "fp32_flops_per_s": 2 * n**3 / fp32_ms * 1e3, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()}


def _ceilings(out_dir: Path) -> dict:
    path = point_path(out_dir, SUITES["gpu"]["ceilings"], "h200")
    if not path.exists():
        write_point(out_dir, SUITES["gpu"]["ceilings"], "h200", _measure_ceilings({}, out_dir))
    return json.loads(path.read_text())


def _dense_points() -> list[tuple[str, dict]]:
    shapes = [(S, *GPU_HEADS) for S in GPU_SEQ_LENS] + [(S, *GPU_GROUPED) for S in GPU_GROUPED_SEQ_LENS]
    return [(f"S{S}-h{Hq}x{Hkv}", dict(S=S, Hq=Hq, Hkv=Hkv)) for S, Hq, Hkv in shapes]


def _measure_dense(params: dict, out_dir: Path) -> dict:
    """Dense causal SDPA, bf16: cuDNN and FlashAttention-2 backends (cuDNN alone past EVENT_TIMED_S).
    Grouped heads are timed on repeated k, v: the same FLOPs as a grouped kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    S, Hq, Hkv = params["S"], params["Hq"], params["Hkv"]
    q, k, v = _gpu_qkv(S, Hq, Hkv)
    k, v = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    record = {"shape": dict(B=1, Hq=Hq, Hkv=Hkv, S=S, D=GPU_HEAD_DIM), "dtype": "bfloat16",
              "flops": 2 * Hq * S * S * GPU_HEAD_DIM, "timing": "do_bench median" if S <= EVENT_TIMED_S else "CUDA events, median of 2 after 1 warm-up"}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        if name == "flash" and S > EVENT_TIMED_S:
            continue
        with sdpa_kernel(backend):
            call = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
            record[f"{name}_ms"] = event_ms(call) if S > EVENT_TIMED_S else bench_ms(call)
    return record


def _dense(S: int, Hq: int, Hkv: int, out_dir: Path) -> dict:
    path = point_path(out_dir, SUITES["gpu"]["dense_sdpa"], f"S{S}-h{Hq}x{Hkv}")
    if not path.exists():
        write_point(out_dir, SUITES["gpu"]["dense_sdpa"], path.stem.split("-", 1)[1],
                    _measure_dense(dict(S=S, Hq=Hq, Hkv=Hkv), out_dir))
    return json.loads(path.read_text())


def _moba_points() -> list[tuple[str, dict]]:
    shapes = [(S, *GPU_HEADS, bs, k) for S in GPU_SEQ_LENS for bs, k in GPU_CONFIGS]
    shapes += [(S, *GPU_GROUPED, 512, 3) for S in GPU_GROUPED_SEQ_LENS]
    shapes.sort(key=lambda shape: shape[0])   # by length: a run cut short keeps the short ones
    return [(f"S{S}-bs{bs}-k{k}-h{Hq}x{Hkv}", dict(S=S, Hq=Hq, Hkv=Hkv, block_size=bs, top_k=k))
            for S, Hq, Hkv, bs, k in shapes]


def _routing_counts(routed: torch.Tensor, S: int, block_size: int) -> dict:
    """From routed int32 [Hq, S, R]: attended and causal (query, key) pairs, the router's eligible
    (query, block) pairs, routed pairs; density = attended / causal."""
    Hq = routed.shape[0]
    pos = torch.arange(S, dtype=torch.float64)
    routed_pairs = int((routed >= 0).sum())
    attended = Hq * float((pos % block_size + 1).sum()) + routed_pairs * block_size
    causal = Hq * S * (S + 1) / 2
    return {"density": attended / causal, "attended_pairs": attended, "routed_pairs": routed_pairs,
            "eligible_blocks": Hq * float((pos // block_size).sum())}


def _measure_moba(params: dict, out_dir: Path) -> dict:
    """The Triton forward (impl="triton", no grad) and its router alone; floors from measured rates."""
    import moba_edu as me
    from moba_edu import efficient
    from moba_edu.kernels import router
    from moba_edu.kernels.layout import default_partial_budget, layout, tiles_per_chunk
    from moba_edu.kernels.moba_fwd import moba_forward

    ceil = _ceilings(out_dir)
    S, Hq, Hkv, bs, top_k = (params[key] for key in ("S", "Hq", "Hkv", "block_size", "top_k"))
    dense = _dense(S, Hq, Hkv, out_dir)
    q, k, v = _gpu_qkv(S, Hq, Hkv)
    D, scale = GPU_HEAD_DIM, GPU_HEAD_DIM ** -0.5
    lay = layout((S,), bs, q.device, True)
    call = lambda: me.moba_attention(q, k, v, block_size=bs, top_k=top_k, impl="triton")  # noqa: E731
    with torch.inference_mode():
        router_ms = bench_ms(lambda: router.packed_route(q, router.block_means(k, lay), lay, top_k))
        routed = router.packed_route(q, router.block_means(k, lay), lay, top_k)
        chunk_tiles = tiles_per_chunk(lay, Hq, routed.shape[-1], D, 2, default_partial_budget(q))
        schedule_ms = bench_ms(lambda: router.schedule(routed, lay, chunk_tiles))
        del routed
        moba_ms = bench_ms(call)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        o = call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del o
        _, _, sched = moba_forward(q, k, v, (S,), bs, top_k, scale)
        counts = _routing_counts(sched.routed.cpu(), S, bs)
        n_chunks, R = sched.n_chunks, sched.R
        del sched
        torch_rung_ms = None
        if S <= TORCH_RUNG_MAX_S and counts["routed_pairs"] * bs * 8 < 40 * 10**9:  # its [rows, block] tiles fit
            torch_rung_ms = bench_ms(lambda: efficient.moba_attention(q, k, v, bs, top_k, scale))
    # Router floor: read q and k once, write R int32 per (query, head); 2 D float32 FLOPs per eligible block.
    router_bytes = 2 * q.numel() + 2 * k.numel() + 4 * Hq * S * R
    router_flops = 2 * D * counts["eligible_blocks"]
    router_floor_ms = 1e3 * max(router_bytes / ceil["copy_bytes_per_s"], router_flops / ceil["fp32_flops_per_s"])
    flops = 4 * D * counts["attended_pairs"]
    qkvo_bytes = 2 * (2 * q.numel() + 2 * k.numel())
    record = {"shape": dict(B=1, Hq=Hq, Hkv=Hkv, S=S, D=D), "dtype": "bfloat16", "block_size": bs, "top_k": top_k,
              **counts, "moba_ms": moba_ms, "router_ms": router_ms, "schedule_ms": schedule_ms,
              "attention_ms": moba_ms - router_ms - schedule_ms, "moba_tflops_per_s": flops / moba_ms / 1e9,
              "router_bytes": router_bytes, "router_flops": router_flops, "router_floor_ms": router_floor_ms,
              "router_over_floor": router_ms / router_floor_ms, "peak_bytes": peak, "extra_bytes": peak - 2 * q.numel(),
              "qkvo_bytes": qkvo_bytes, "n_chunks": n_chunks, "torch_rung_ms": torch_rung_ms,
              "cudnn_ms": dense["cudnn_ms"], "flash_ms": dense.get("flash_ms"),
              "density_bound_ms": dense["cudnn_ms"] * counts["density"], "ceilings": ceil}
    for name in ("cudnn", "flash", "torch_rung"):
        if record[f"{name}_ms"] is not None:
            record[f"speedup_vs_{name}"] = record[f"{name}_ms"] / moba_ms
    record["target_speedup_vs_cudnn"] = GPU_TARGETS.get((S, bs, top_k)) if Hq == Hkv else None
    print(f"  moba {moba_ms:.4g} ms (router {router_ms:.3g} ms, {record['router_over_floor']:.3g}x its floor, "
          f"schedule {schedule_ms:.3g} ms), "
          f"cuDNN {dense['cudnn_ms']:.4g} ms: {record['speedup_vs_cudnn']:.3g}x (density bound "
          f"{1 / counts['density']:.3g}x), extra memory {record['extra_bytes'] / GIB:.3g} GiB", flush=True)
    return record


def _tile_points() -> list[tuple[str, dict]]:
    """The routed kernel's tiles (BLOCK_M, BLOCK_N, warps, stages), at two shapes."""
    tiles = [(128, 64, 8, 3), (64, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 64, 4, 3)]
    shapes = [(131072, 512, 3), (32768, 4096, 12)]
    return [(f"S{S}-bs{bs}-k{k}-m{m}n{n}w{w}s{st}", dict(S=S, block_size=bs, top_k=k, tile=(m, n, w, st)))
            for S, bs, k in shapes for m, n, w, st in tiles]


def _measure_tiles(params: dict, out_dir: Path) -> dict:
    from moba_edu.kernels.moba_fwd import launch_config, moba_forward

    S, bs, top_k, (m, n, w, st) = (params[key] for key in ("S", "block_size", "top_k", "tile"))
    q, k, v = _gpu_qkv(S, *GPU_HEADS)
    config = dict(launch_config(GPU_HEAD_DIM), routed=dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st))
    with torch.inference_mode():
        ms = bench_ms(lambda: moba_forward(q, k, v, (S,), bs, top_k, GPU_HEAD_DIM ** -0.5, config=config))
    print(f"  tile {params['tile']}: {ms:.4g} ms", flush=True)
    return {"shape": dict(B=1, Hq=GPU_HEADS[0], Hkv=GPU_HEADS[1], S=S, D=GPU_HEAD_DIM), "block_size": bs,
            "top_k": top_k, "tile": dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st), "moba_ms": ms}


def _plot_moba(records: list[dict], out_dir: Path) -> list[Path]:
    """Speed-up over cuDNN against S per (block_size, top_k) with its density bound and the targets;
    the router's time over its floor."""
    import matplotlib.pyplot as plt

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
    for (S, bs, k), target in GPU_TARGETS.items():
        ax_speed.plot([S], [target], marker="*", ms=13, color="k", ls="none")
        ax_speed.annotate(f"target {target:g}x ({bs}, {k})", (S, target), textcoords="offset points", xytext=(6, -10),
                          fontsize=7)
    ax_speed.set(ylabel="speed-up over cuDNN dense causal (x)", yscale="log",
                 title="MoBA forward vs dense causal attention (cuDNN)")
    ax_router.axhline(ROUTER_FLOOR_TARGET, color="k", ls="--", lw=1, label="target: 2x the floor")
    ax_router.set(ylabel="router time / floor", ylim=(0, None),
                  title="router: time over max(bytes / copy rate, FLOPs / float32 rate)")
    for ax in (ax_speed, ax_router):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length S (tokens)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    first = records[0]
    fig.suptitle(f"Triton MoBA forward on {first['machine'].get('gpu', '?')}: bf16, B=1, head dim "
                 f"{first['shape']['D']}, torch {first['machine']['torch']}, triton {first['machine']['triton']}",
                 fontsize=10)
    fig.tight_layout()
    path = out_dir / "gpu_moba_forward.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _no_plot(records: list[dict], out_dir: Path) -> list[Path]:
    return []


# ---------------------------------------------------------------- registry and entry point

SUITES: dict[str, dict[str, Suite]] = {
    "cpu": {"torch_vs_naive": Suite("torch_vs_naive", "cpu", _torch_vs_naive_points, _measure_torch_vs_naive,
                                    _plot_torch_vs_naive)},
    "gpu": {"ceilings": Suite("ceilings", "gpu", lambda: [("h200", {})], _measure_ceilings, _no_plot),
            "dense_sdpa": Suite("dense_sdpa", "gpu", _dense_points, _measure_dense, _no_plot),
            "moba_fwd": Suite("moba_fwd", "gpu", _moba_points, _measure_moba, _plot_moba),
            "moba_fwd_tiles": Suite("moba_fwd_tiles", "gpu", _tile_points, _measure_tiles, _no_plot)},
}
SUITES["gpu"].update(bench_backward.suites(Suite))


def selected(suite: Suite, point: str, only: list[str] | None) -> bool:
    return not only or any(fnmatch.fnmatch(suite.name, pat) or fnmatch.fnmatch(f"{suite.name}/{point}", pat)
                           for pat in only)


def run(device: str, only: list[str] | None, out_dir: Path) -> list[Path]:
    """Measure every selected point of the device's suites, writing each JSON at once; then re-plot."""
    for suite in SUITES[device].values():
        for point, params in suite.points():
            if selected(suite, point, only):
                start = time.perf_counter()
                path = write_point(out_dir, suite, point, suite.measure(params, out_dir))
                print(f"{path}  ({time.perf_counter() - start:.1f} s)", flush=True)
    return plot_all(out_dir)


def plot_all(out_dir: Path) -> list[Path]:
    """Re-draw every benchmark figure from the JSON under out_dir (no measuring). Returns the PNGs."""
    written = []
    for device_suites in SUITES.values():
        for suite in device_suites.values():
            records = read_points(out_dir, suite)
            if records:
                written += suite.plot(records, out_dir)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    device = parser.add_mutually_exclusive_group(required=True)
    device.add_argument("--cpu", action="store_true", help="run the CPU suites")
    device.add_argument("--gpu", action="store_true", help="run the GPU suites")
    device.add_argument("--child", help=argparse.SUPPRESS)  # one point, inside a fresh process
    parser.add_argument("--only", nargs="+", metavar="NAME", help='suites or "suite/point" (fnmatch patterns)')
    parser.add_argument("--out", type=Path, default=BENCH_DIR, help="folder for JSON and plots (figures/bench)")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child_measure(json.loads(args.child))))
        return
    import matplotlib

    matplotlib.use("Agg")
    for path in run("cpu" if args.cpu else "gpu", args.only, args.out):
        print(path)


if __name__ == "__main__":
    main()
