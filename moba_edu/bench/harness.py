"""The benchmark harness: the suite registry, point names and JSON files, timers, peak memory.

Suites (one module each) `register` themselves here; `python -m moba_edu.bench` imports them
(moba_edu.bench.suites) and `run`s the registry. Every point is one JSON file, `<out>/<device dir>/<suite>-<point>.json`, written as soon
as it is measured. A point's name is its parameters, tagged and joined by "-" (`point_name`), so
the first "-" of a file name ends the suite's name.

Timers: `wall_times` (CPU, perf_counter), `do_bench_ms` (the median of `triton.testing.do_bench`),
`event_ms` (a few CUDA-event timed calls, for calls of seconds) and `gpu_ms` (do_bench, or events
where one call is long). Memory: `peak_rss_bytes` (CPU) and `cuda_peak_bytes` (GPU).
"""

from __future__ import annotations

import fnmatch
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..environment import triton_version

BENCH_DIR = Path(__file__).resolve().parents[2] / "figures" / "bench"
DEVICE_DIRS = {"cpu": "cpu", "gpu": "h200"}
GIB = 2**30
GPU_HEAD_DIM = 128   # every GPU suite: head dim 128 (but the *_hdim suites), bf16 (B = 1 but in `decode`)


@dataclass(frozen=True)
class Suite:
    """A named list of points measured on one device ("cpu" or "gpu").

    points() -> [(point name, params)]; measure(params, out_dir) -> record (without the common fields;
    out_dir holds the points measured so far, for ratios); plot(records, out_dir) -> the written figure
    paths (records: every JSON of the suite), or None for a suite without a figure.
    """

    name: str
    device: str
    points: Callable[[], list[tuple[str, dict]]]
    measure: Callable[[dict, Path], dict]
    plot: Callable[[list[dict], Path], list[Path]] | None = None


SUITES: dict[str, Suite] = {}


def register(suite: Suite) -> Suite:
    """Add a suite to the registry (in import order: the order `run` measures them in)."""
    if suite.device not in DEVICE_DIRS:
        raise ValueError(f"suite {suite.name!r}: device must be one of {sorted(DEVICE_DIRS)}, got {suite.device!r}")
    if "-" in suite.name:
        raise ValueError(f"suite name {suite.name!r} holds '-', the separator of suite and point in file names")
    if suite.name in SUITES:
        raise ValueError(f"suite name {suite.name!r} is taken")
    SUITES[suite.name] = suite
    return suite


def suites(device: str) -> list[Suite]:
    """The registered suites of one device ("cpu" or "gpu")."""
    return [suite for suite in SUITES.values() if suite.device == device]


_TAGS = (("S", "S{}"), ("block_size", "bs{}"), ("top_k", "k{}"), ("heads", "h{}x{}"), ("head_dim", "d{}"),
         ("B", "B{}"), ("tile", "m{}n{}w{}s{}"))


def point_name(what: str | None = None, **params) -> str:
    """A point's name: an optional leading word (an impl, a control), then the parameters, tagged, in a
    fixed order: S{S}, bs{block_size}, k{top_k}, h{Hq}x{Hkv} (heads), d{D} (head dim; suites at GPU_HEAD_DIM leave
    it out), B{B} (batch size; suites of B = 1 leave it out), m{BLOCK_M}n{BLOCK_N}w{warps}s{stages} (tile).
    point_name(S=8192, block_size=512, top_k=3, heads=(16, 16)) == "S8192-bs512-k3-h16x16"."""
    unknown = set(params) - {tag for tag, _ in _TAGS}
    if unknown:
        raise ValueError(f"point_name: unknown parameters {sorted(unknown)}; known: {[tag for tag, _ in _TAGS]}")
    if what is not None and (not what or "-" in what):
        raise ValueError(f"point_name: what must be a non-empty word without '-', got {what!r}")
    parts = [] if what is None else [what]
    for tag, form in _TAGS:
        if tag in params:
            value = params[tag]
            parts.append(form.format(*value) if isinstance(value, (tuple, list)) else form.format(value))
    return "-".join(parts)


def moba_point(S: int, Hq: int, Hkv: int, block_size: int, top_k: int) -> tuple[str, dict]:
    """(name, params) of a MoBA point: one sequence of S tokens, Hq query and Hkv key/value heads."""
    return (point_name(S=S, block_size=block_size, top_k=top_k, heads=(Hq, Hkv)),
            dict(S=S, Hq=Hq, Hkv=Hkv, block_size=block_size, top_k=top_k))


def point_path(out_dir: Path, suite: Suite, point: str) -> Path:
    return Path(out_dir) / DEVICE_DIRS[suite.device] / f"{suite.name}-{point}.json"


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


def write_json(path: Path, record: dict) -> Path:
    """The one JSON format of figures/bench: indent 1, sorted keys, a final newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def write_point(out_dir: Path, suite: Suite, point: str, record: dict) -> Path:
    """One JSON per point, with the common fields (suite, point, device, machine, date)."""
    record = {"suite": suite.name, "point": point, "device": suite.device, "machine": machine(),
              "date": time.strftime("%Y-%m-%d"), **record}
    return write_json(point_path(out_dir, suite, point), record)


def read_point(out_dir: Path, suite: Suite, point: str) -> dict | None:
    """A measured point's record, or None where it was not measured."""
    path = point_path(out_dir, suite, point)
    return json.loads(path.read_text()) if path.exists() else None


def read_points(out_dir: Path, suite: Suite) -> list[dict]:
    folder = Path(out_dir) / DEVICE_DIRS[suite.device]
    return [json.loads(p.read_text()) for p in sorted(folder.glob(f"{suite.name}-*.json"))]


def selected(suite: Suite, point: str, only: list[str] | None) -> bool:
    """Whether `--only` patterns (fnmatch, over "suite" or "suite/point") select a point; all without them."""
    return not only or any(fnmatch.fnmatch(suite.name, pat) or fnmatch.fnmatch(f"{suite.name}/{point}", pat)
                           for pat in only)


def listed(device: str, only: list[str] | None) -> list[str]:
    """"suite/point" of every selected point of the device's suites, in run order (measures nothing)."""
    return [f"{suite.name}/{point}" for suite in suites(device) for point, _ in suite.points()
            if selected(suite, point, only)]


def run(device: str, only: list[str] | None, out_dir: Path) -> list[Path]:
    """Measure every selected point of the device's registered suites, writing each JSON at once."""
    written = []
    for suite in suites(device):
        for point, params in suite.points():
            if selected(suite, point, only):
                start = time.perf_counter()
                written.append(write_point(out_dir, suite, point, suite.measure(params, Path(out_dir))))
                print(f"{written[-1]}  ({time.perf_counter() - start:.1f} s)", flush=True)
    return written


# ---------------------------------------------------------------- timers

def wall_times(fn: Callable[[], object], min_repeats: int = 3, min_seconds: float = 2.0,
               max_repeats: int = 15) -> list[float]:
    """Wall times of fn() in seconds after one warm-up call: at least min_repeats runs and about min_seconds."""
    fn()
    times = []
    while len(times) < max_repeats and (len(times) < min_repeats or sum(times) < min_seconds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def do_bench_ms(fn: Callable[[], object], grad_to_none=None) -> float:
    """Median of `triton.testing.do_bench` in ms (CUDA events; compile and warm-up excluded)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def event_ms(fn: Callable[[], object], calls: int = 2) -> float:
    """Median of a few CUDA-event timed calls after one warm-up, in ms: for calls of seconds."""
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


def gpu_ms(fn: Callable[[], object], grad_to_none=None, long_ms: float = 50.0, calls: int = 3) -> float:
    """do_bench_ms, or the median of `calls` CUDA-event calls where one call takes over long_ms
    (do_bench's 100 ms budget would hold one or two calls; this spends little of a GPU lease). With
    calls=1 the probing call is the measurement: one warm-up, one timed call."""
    first = event_ms(fn, calls=1)
    if first < long_ms:
        return do_bench_ms(fn, grad_to_none)
    return first if calls == 1 else event_ms(fn, calls=calls)


# ---------------------------------------------------------------- memory

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


def cuda_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA memory allocated while fn() runs, beyond what was allocated before it (its result is
    dropped once the peak is read)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def sdpa_backends(measure: Callable[[], dict], names=("cudnn", "flash")) -> dict:
    """measure() -> {key: value} under each dense SDPA backend of `names`, cuDNN and FlashAttention-2, as
    {"cudnn_<key>": value, ...}; a backend that does not take the inputs (e.g. a head dim it lacks)
    leaves "<name>_error" instead."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    result = {}
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    for name, backend in ((name, backends[name]) for name in names):
        try:
            with sdpa_kernel(backend):
                result.update({f"{name}_{key}": value for key, value in measure().items()})
        except RuntimeError as exc:
            result[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return result


# ---------------------------------------------------------------- inputs

def qkv(S: int, Hq: int, Hkv: int, seed: int = 0, grad_out: bool = False,
        head_dim: int = GPU_HEAD_DIM) -> tuple[torch.Tensor, ...]:
    """GPU inputs, bf16, B = 1: q [1, Hq, S, D], k, v [1, Hkv, S, D] (D = head_dim), and with grad_out
    an output gradient dO [1, Hq, S, D] (drawn last: q, k, v do not depend on it)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda h: torch.randn(1, h, S, head_dim, device="cuda", generator=gen).bfloat16()  # noqa: E731
    return (make(Hq), make(Hkv), make(Hkv)) + ((make(Hq),) if grad_out else ())
