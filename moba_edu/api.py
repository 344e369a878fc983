"""The public entry points (docs/design.md §2): check the arguments, pick a rung, call it.

A rung is a module (`RUNGS`) with
    moba_attention(q, k, v, block_size, top_k, scale) -> (o [B,Hq,S,D], lse [B,Hq,S])
and, optionally, a native packed version
    moba_attention_varlen(q, k, v, cu_seqlens, block_size, top_k, scale) -> (o [T,Hq,D], lse [Hq,T])
where cu_seqlens has been checked. Rungs without a packed version are run once per sequence here. A
rung may also define `unsupported(q, k, v) -> Exception | None`: the error (a TypeError or ValueError
naming the argument) for inputs it cannot take, None when it can. An explicit impl raises it;
impl="auto" falls back to the torch rung instead.
"""

from __future__ import annotations

import torch

from . import efficient, kernels, naive
from .inputs import check_cu_seqlens, check_impl, check_int, check_scale, check_tensors

# A module-level dict of modules: torch.compile(fullgraph=True) traces the lookup (importing a module
# by name inside the call would not trace). `moba_edu.kernels` is cheap to import: its submodules
# import triton only when a kernel first runs.
RUNGS = {"naive": naive, "torch": efficient, "triton": kernels}


def _pick_rung(impl: str, q, k, v):
    if impl == "auto":
        return kernels if q.is_cuda and kernels.unsupported(q, k, v) is None else efficient
    rung = RUNGS[impl]
    error = rung.unsupported(q, k, v) if hasattr(rung, "unsupported") else None
    if error is not None:
        raise error
    if rung is kernels:
        kernels.warn_if_interpreted(stacklevel=4)  # points at the caller of the public function
    return rung


def _autocast(q, k, v):
    """Under torch.autocast, attention runs in the autocast dtype, as SDPA does."""
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = (t.to(dtype) if t.is_floating_point() else t for t in (q, k, v))
    return q, k, v


def _common(q, k, v, rank, layout, caller, block_size, top_k, scale, impl):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    q, k, v = _autocast(q, k, v)
    check_tensors(q, k, v, rank=rank, layout=layout, caller=caller)
    block_size = check_int(block_size, "block_size")
    top_k = check_int(top_k, "top_k")
    scale = check_scale(scale, q.shape[-1])
    check_impl(impl)
    return q, k, v, block_size, top_k, scale


def moba_attention(q, k, v, *, block_size, top_k, scale=None, impl="auto", return_lse=False):
    """Causal MoBA attention.

    q: [B, Hq, S, D]; k, v: [B, Hkv, S, D] with Hq a multiple of Hkv (heads before the sequence: for
    [B, S, H, D] tensors call .transpose(1, 2) first; with Hq = Hkv such tensors are not rejected but
    silently read as [B, H, S, D], a wrong answer). Returns o [B, Hq, S, D] in q's dtype, and with
    return_lse also lse float32 [B, Hq, S], the log-sum-exp of each query's scaled scores over the
    keys it attends. `scale` defaults to 1/sqrt(D). `impl`: "naive", "torch", "triton" or "auto"
    (docs/design.md §2); "triton" without a CUDA GPU runs Triton's interpreter, seconds per call (it
    warns once per process; set `moba_edu.kernels.warn_interpreter = False` to silence it).

    Inputs are not checked for NaN or inf: a NaN in one key makes its block's mean NaN, top-k ranks
    NaN first, so every query for which that block is eligible routes to it and its output is NaN.
    """
    q, k, v, block_size, top_k, scale = _common(q, k, v, 4, "[B,H,S,D]", "moba_attention", block_size, top_k,
                                                 scale, impl)
    rung = _pick_rung(impl, q, k, v)
    with torch.autocast(q.device.type, enabled=False):
        o, lse = rung.moba_attention(q, k, v, block_size, top_k, scale)
    return (o, lse) if return_lse else o


def moba_attention_varlen(q, k, v, cu_seqlens, max_seqlen, *, block_size, top_k, scale=None, impl="auto",
                          return_lse=False):
    """Causal MoBA attention over packed sequences (flash-attn's varlen convention).

    q: [T, Hq, D]; k, v: [T, Hkv, D]; cu_seqlens: int32/int64 [n+1], sequence i holds tokens
    cu_seqlens[i]:cu_seqlens[i+1] (length 0 allowed). max_seqlen: an int at least the longest length,
    as flash-attn asks; it is validated only: every rung reads the lengths from cu_seqlens, so a larger
    max_seqlen changes nothing. Blocks restart at every sequence start and no query sees another
    sequence. Returns o [T, Hq, D] and, with return_lse, lse float32 [Hq, T] (flash-attn's layout).
    NaN and impl="triton" on a CPU: as in `moba_attention`.
    """
    q, k, v, block_size, top_k, scale = _common(q, k, v, 3, "[T,H,D]", "moba_attention_varlen", block_size,
                                                 top_k, scale, impl)
    offsets = check_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0], q.device)
    rung = _pick_rung(impl, q, k, v)
    with torch.autocast(q.device.type, enabled=False):
        if hasattr(rung, "moba_attention_varlen"):
            o, lse = rung.moba_attention_varlen(q, k, v, cu_seqlens, block_size, top_k, scale)
        else:
            o, lse = _per_sequence(rung, q, k, v, offsets.tolist(), block_size, top_k, scale)
    return (o, lse) if return_lse else o


def _per_sequence(rung, q, k, v, offsets, block_size, top_k, scale):
    """Run a batched rung on each packed sequence in turn: [T,H,D] slices viewed as [1,H,S,D]."""
    outs, lses = [], []
    for start, end in zip(offsets[:-1], offsets[1:]):
        as_batch = lambda x: x[start:end].transpose(0, 1).unsqueeze(0)  # noqa: E731
        o, lse = rung.moba_attention(as_batch(q), as_batch(k), as_batch(v), block_size, top_k, scale)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    if not outs:  # no sequence at all (cu_seqlens = [0])
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_empty(q.shape), q.new_empty(q.shape[1], 0, dtype=lse_dtype)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


def moba_attn_varlen(q, k, v, cu_seqlens, max_seqlen, moba_chunk_size, moba_topk):
    """Drop-in alias with the signature of MoonshotAI/MoBA's `moba_attn_varlen`: q [T,H,D] -> o [T,H,D]."""
    return moba_attention_varlen(q, k, v, cu_seqlens, max_seqlen, block_size=moba_chunk_size, top_k=moba_topk)
