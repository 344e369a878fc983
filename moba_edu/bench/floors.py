"""Floors: the least time a kernel could take, from the GPU's measured ceilings.

A kernel's floor is max(its bytes / copy bandwidth, its FLOPs / matrix rate): it cannot move its
data faster than a plain copy, nor compute faster than a large matrix product. The ceilings (suite
`ceilings`, one point per GPU) are measured once per output folder and read back by every suite:

- copy_bytes_per_s  bytes read + written per second by a 1 GiB bf16 copy;
- bf16_flops_per_s  bf16 tensor-core rate of an 8192^3 product;
- fp32_flops_per_s  float32 rate (TF32 off, what the router's ieee gate dot products use), 8192^3.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .harness import DEVICE_DIRS, GIB, Suite, do_bench_ms, point_path, register, write_point


def measure_ceilings(params: dict, out_dir: Path) -> dict:
    """Copy bandwidth (1 GiB bf16 copy) and the bf16 and float32 (TF32 off) rates of 8192^3 products."""
    x = torch.randn(GIB // 2, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    copy_ms = do_bench_ms(lambda: y.copy_(x))
    del x, y
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    bf16_ms = do_bench_ms(lambda: a @ b)
    a, b = a.float(), b.float()
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    fp32_ms = do_bench_ms(lambda: a @ b)
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return {"copy_bytes_per_s": 2 * GIB / copy_ms * 1e3, "bf16_flops_per_s": 2 * n**3 / bf16_ms * 1e3,
            "fp32_flops_per_s": 2 * n**3 / fp32_ms * 1e3, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()}


CEILINGS = register(Suite("ceilings", "gpu", lambda: [(DEVICE_DIRS["gpu"], {})], measure_ceilings))


def ceilings(out_dir: Path) -> dict:
    """The ceilings' record under out_dir, measured (and written) first where it is missing or was
    measured on another kind of GPU."""
    path = point_path(out_dir, CEILINGS, DEVICE_DIRS["gpu"])
    if not path.exists() or json.loads(path.read_text())["machine"].get("gpu") != torch.cuda.get_device_name():
        write_point(out_dir, CEILINGS, DEVICE_DIRS["gpu"], measure_ceilings({}, out_dir))
    return json.loads(path.read_text())


def floor_ms(ceil: dict, *, nbytes: float, flops: float, rate: str) -> float:
    """max(nbytes / copy bandwidth, flops / the `rate` ("bf16" or "fp32") matrix rate), in ms."""
    return 1e3 * max(nbytes / ceil["copy_bytes_per_s"], flops / ceil[f"{rate}_flops_per_s"])
