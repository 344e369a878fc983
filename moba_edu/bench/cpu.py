"""CPU suite `torch_vs_naive`: the naive (dense mask) and torch (efficient) rungs, forward pass.

S = 1K ... 32K, 4 heads, head dim 64, block 256, top_k 3, float32, one thread. Time: median of
repeats (`harness.wall_times`). Memory: peak RSS of a fresh subprocess per point (this module run as
`python -m moba_edu.bench.cpu PARAMS`), minus its RSS before the call, against the formulas
`cost.naive_bytes` and `cost.torch_bytes`. The naive rung is skipped where its predicted peak passes
8 GiB. The figure shows ratios: CPU times are not comparable between machines.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from .. import cost
from .harness import (GIB, Suite, point_name, read_point, register, reset_peak_rss, rss_bytes, peak_rss_bytes,
                      wall_times)

# One thread: the CPU is shared with other work, and idle OpenMP threads of a busy machine slow many
# small ops (the torch rung) far more than a few large ones (naive). Ratios are per core.
CPU_CONFIG = dict(B=1, Hq=4, Hkv=4, D=64, block_size=256, top_k=3, threads=1)
CPU_SEQ_LENS = [1024, 2048, 4096, 8192, 16384, 32768]
NAIVE_LIMIT_BYTES = 8 * GIB
SPEEDUP_GOAL = (8192, 5.0)  # the project's goal: at S = 8192 the torch rung is >= 5x faster than naive
MEMORY_TOLERANCE = 2.0  # measured extra memory within [1/2, 2] x the formula
SHAPE_KEYS = ("B", "Hq", "Hkv", "S", "D")


def points() -> list[tuple[str, dict]]:
    return [(point_name(impl, S=S), dict(CPU_CONFIG, S=S, impl=impl)) for S in CPU_SEQ_LENS for impl in ("naive", "torch")]


def in_fresh_process(params: dict) -> dict:
    """`child_measure(params)` in a new Python process (importing this same moba_edu), so that its
    peak memory is this point's alone."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "moba_edu.bench.cpu", json.dumps(params)],
                          capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_measure(params: dict) -> dict:
    """Inside the fresh process: make inputs, note the RSS, time the forward pass, note the peak."""
    import moba_edu as me

    torch.set_num_threads(params["threads"])
    torch.manual_seed(0)
    B, Hq, Hkv, S, D = (params[key] for key in SHAPE_KEYS)
    q = torch.randn(B, Hq, S, D)
    k, v = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    reset_peak_rss()
    base = rss_bytes()
    call = lambda: me.moba_attention(q, k, v, block_size=params["block_size"], top_k=params["top_k"],  # noqa: E731
                                     impl=params["impl"])
    with torch.inference_mode():
        times = wall_times(call)
    return {"times_s": times, "base_rss_bytes": base, "peak_rss_bytes": peak_rss_bytes(),
            "torch_threads": torch.get_num_threads()}


def measure(params: dict, out_dir: Path) -> dict:
    S, impl = params["S"], params["impl"]
    predict = cost.naive_bytes if impl == "naive" else cost.torch_bytes
    predicted = predict(**{key: params[key] for key in (*SHAPE_KEYS, "block_size", "top_k")})
    record = {"impl": impl, "shape": {key: params[key] for key in SHAPE_KEYS},
              "dtype": "float32", "block_size": params["block_size"], "top_k": params["top_k"],
              "density": cost.density(S, params["block_size"], params["top_k"]), "pass": "forward (inference_mode)",
              "memory_formula": cost.NAIVE_FORMULA if impl == "naive" else cost.TORCH_FORMULA,
              "predicted_extra_bytes": predicted}
    if impl == "naive" and predicted > NAIVE_LIMIT_BYTES:
        return {**record, "skipped": f"predicted peak {predicted / GIB:.1f} GiB > {NAIVE_LIMIT_BYTES / GIB:.0f} GiB"}
    measured = in_fresh_process(params)
    extra = measured["peak_rss_bytes"] - measured["base_rss_bytes"]
    record = {**record, **measured, "median_s": statistics.median(measured["times_s"]), "extra_bytes": extra,
              "measured_over_predicted": extra / predicted}
    naive = read_point(out_dir, TORCH_VS_NAIVE, point_name("naive", S=S))
    if impl == "torch" and naive and "median_s" in naive:
        record["speedup_vs_naive"] = naive["median_s"] / record["median_s"]
    return record


def plot(records: list[dict], out_dir: Path) -> list[Path]:
    """Three panels against S: speed-up of torch over naive, peak extra memory (measured and formula),
    and the torch rung's measured / predicted memory."""
    import matplotlib.pyplot as plt

    from .plots import s_axes, save

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
    S_goal, goal = SPEEDUP_GOAL
    ax_speed.plot([S_goal], [goal], marker="*", ms=12, color="k", ls="none", label=f"target: {goal:g}x at S={S_goal}")
    ax_speed.set(ylabel="speed-up of the torch rung (x)", title="speed-up on one core",
                 ylim=(0, 1.15 * max(speedups + [goal])))

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

    s_axes(ax_speed, ax_ratio, legend_loc="upper left")
    s_axes(ax_mem, legend_loc="lower right")
    first = (measured or records)[0]
    shape = first["shape"]
    fig.suptitle(f"CPU forward, float32: torch rung vs naive rung (B={shape['B']}, Hq={shape['Hq']}, D={shape['D']}, "
                 f"block_size={first['block_size']}, top_k={first['top_k']}) on {first['machine']['cpu']}, "
                 f"{first.get('torch_threads', '?')} thread(s)", fontsize=10)
    fig.text(0.01, 0.01, f"formulas (bytes): naive 13 B Hq S²;  torch {cost.TORCH_FORMULA}", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return save(fig, out_dir / "cpu_torch_vs_naive.png")


TORCH_VS_NAIVE = register(Suite("torch_vs_naive", "cpu", points, measure, plot))


if __name__ == "__main__":   # the fresh process of `in_fresh_process`
    print(json.dumps(child_measure(json.loads(sys.argv[1]))))
