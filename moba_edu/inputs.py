"""Argument checking shared by every entry point (docs/design.md §2).

Every bad input gets a `TypeError` or `ValueError` whose message names the argument and says what was
expected, before any rung runs: a wrong shape must never surface as an IndexError deep in a kernel.
"""

from __future__ import annotations

import math
import numbers

import torch

IMPLS = ("naive", "torch", "triton", "auto")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_int(value, name: str, minimum: int = 1) -> int:
    """`value` must be a Python or NumPy integer (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def check_scale(scale, head_dim: int) -> float:
    """`scale` is None (meaning 1/sqrt(head_dim), as in SDPA) or a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be None or a finite real number, got {scale!r}")
    return float(scale)


def check_impl(impl) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def _listing(names: list[str]) -> str:
    """["q", "k", "v"] -> "q, k and v"; ["q", "k"] -> "q and k"."""
    return ", ".join(names[:-1]) + " and " + names[-1]


def check_tensors(q, k, v, rank: int, layout: str, caller: str) -> None:
    """Types, dtypes, devices and shapes of q, k and v (v None: q and k only, for the router).

    `layout` is "[B,H,S,D]" (rank 4) or "[T,H,D]" (rank 3); in both the head axis is axis 1, the only
    axis on which q (Hq heads) and k, v (Hkv heads) may differ. `caller` names the public function in
    the layout hint of a shape mismatch.
    """
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    names = _listing([name for name, _ in named])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
            )
    got = ", ".join(f"{name} {t.dtype}" for name, t in named)
    if len({t.dtype for _, t in named}) > 1:
        raise TypeError(f"{names} must share one dtype, got {got}")
    if len({t.device for _, t in named}) > 1:
        raise ValueError(f"{names} must be on one device, got " + ", ".join(f"{n} {t.device}" for n, t in named))
    for name, t in named:
        if t.dim() != rank:
            raise ValueError(f"{name} must have shape {layout} (rank {rank}), got shape {tuple(t.shape)}")
    if v is not None and k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    head_axis = 1
    q_rest = tuple(s for i, s in enumerate(q.shape) if i != head_axis)
    k_rest = tuple(s for i, s in enumerate(k.shape) if i != head_axis)
    if q_rest != k_rest:
        hint = f" ({caller} takes {layout}; for [B,S,H,D] tensors, transpose(1, 2) first)" if rank == 4 else ""
        raise ValueError(
            f"q and k must agree on every axis of {layout} but the head axis, "
            f"got q {tuple(q.shape)} and k {tuple(k.shape)}{hint}"
        )
    hq, hkv = q.shape[head_axis], k.shape[head_axis]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"the number of query heads (q: {hq}) must be a multiple of the number of key/value heads "
            f"(k: {hkv}) for grouped-query attention"
        )


def check_cu_seqlens(cu_seqlens, max_seqlen, total: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens: int32/int64 [n+1], starts at 0, non-decreasing, ends at `total` (= T).

    `device` is q's device. Returns the offsets as an int64 CPU tensor (for Python-side loops).
    `max_seqlen` must be an int at least the longest sequence, as flash-attn asks; it is validated
    only (every rung reads the lengths from cu_seqlens).
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must have shape [n+1] with n >= 0, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on the device of q ({device}), got {cu_seqlens.device}")
    values = cu_seqlens.detach().to("cpu", torch.int64)
    if values[0].item() != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {values[0].item()}")
    lengths = values[1:] - values[:-1]
    if (lengths < 0).any():
        raise ValueError(f"cu_seqlens must be non-decreasing, got {values.tolist()}")
    if values[-1].item() != total:
        raise ValueError(f"cu_seqlens must end at T = {total} (q.shape[0]), got {values[-1].item()}")
    longest = int(lengths.max().item()) if lengths.numel() else 0
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral):
        raise ValueError(f"max_seqlen must be an int, got {max_seqlen!r}")
    if max_seqlen < longest:
        raise ValueError(f"max_seqlen ({max_seqlen}) is smaller than the longest sequence ({longest})")
    return values
