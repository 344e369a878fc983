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
GPU suites: none yet.
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
        ax.legend(fontsize=7, loc="upper left")
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

# ---------------------------------------------------------------- registry and entry point

SUITES: dict[str, dict[str, Suite]] = {
    "cpu": {"torch_vs_naive": Suite("torch_vs_naive", "cpu", _torch_vs_naive_points, _measure_torch_vs_naive,
                                    _plot_torch_vs_naive)},
    "gpu": {},
}


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
