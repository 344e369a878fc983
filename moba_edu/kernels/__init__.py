"""Rung 3: MoBA in Triton.

Without CUDA the kernels run under Triton's interpreter, which Triton reads from TRITON_INTERPRET when
it is first imported: this is the one place in the package that sets it, so import triton through
`moba_edu.kernels` (its submodules) on a CPU-only machine.
"""

import os
import sys
import warnings

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    if "triton" in sys.modules:
        warnings.warn("triton was imported before moba_edu.kernels and no CUDA device is present: "
                      "set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU")
    os.environ["TRITON_INTERPRET"] = "1"

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The rung (api.py's contract): moba_attention, moba_attention_varlen, unsupported, COMPLETE.
# Submodules import triton, so they are loaded only when a kernel runs.

COMPLETE = False
"""True once forward and backward have both landed: only then does impl="auto" pick this rung."""

MAX_HEAD_DIM = 128  # one [BLOCK_M, D] float32 accumulator per program; past 128 it crowds the registers

BACKWARD_MISSING = ("impl='triton': the Triton backward has not landed yet (the forward has); "
                    "use impl='torch' to differentiate MoBA")


def unsupported(q, k, v):
    """The error for inputs these kernels do not take, else None (api.py raises it for impl="triton";
    impl="auto" falls back to the torch rung)."""
    if q.dtype == torch.float64:
        return TypeError("q: impl='triton' takes float16, bfloat16 or float32, got torch.float64 "
                         "(use impl='torch' or 'naive' for float64)")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        return ValueError(f"q: impl='triton' takes head dims 1 to {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if q.device.type == "cpu" and not INTERPRET:
        return ValueError("q is on the CPU but this machine has CUDA: impl='triton' runs on the GPU "
                          "(move q, k and v to 'cuda', or use impl='torch')")
    if q.device.type not in ("cpu", "cuda"):
        return ValueError(f"q is on {q.device}: impl='triton' runs on CUDA GPUs (or the CPU interpreter)")
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) < (8, 0):
        name = torch.cuda.get_device_name(q.device)
        return ValueError(f"q is on {name}: impl='triton' needs a GPU of compute capability 8.0 or newer")
    try:
        import triton  # noqa: F401
    except ImportError:
        return ValueError("impl='triton' needs the triton package (Linux), which is not installed")
    return None


class _ForwardOnly(torch.autograd.Function):
    """Runs the Triton forward; a backward call raises, rather than silently using another rung."""

    @staticmethod
    def forward(ctx, q, k, v, run):
        o, lse = run(q, k, v)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        raise NotImplementedError(BACKWARD_MISSING)


def _run(q, k, v, lengths, block_size, top_k, scale):
    """o (q's layout and dtype), lse float32 [Hq, T] by moba_fwd.moba_forward."""
    from .moba_fwd import moba_forward

    def run(q, k, v):
        dtype = q.dtype
        if INTERPRET and dtype == torch.bfloat16:  # the interpreter's bf16 arithmetic is wrong (triton #11584)
            q, k, v = q.float(), k.float(), v.float()
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        o, lse, _ = moba_forward(q.detach(), k.detach(), v.detach(), lengths, block_size, top_k, scale)
        return o.to(dtype), lse

    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return _ForwardOnly.apply(q, k, v, run)
    return run(q, k, v)


def moba_attention(q, k, v, block_size, top_k, scale):
    """q [B, Hq, S, D], k, v [B, Hkv, S, D] -> o [B, Hq, S, D], lse float32 [B, Hq, S]."""
    B, Hq, S, _ = q.shape
    o, lse = _run(q, k, v, (S,) * B, block_size, top_k, scale)
    return o, lse.view(Hq, B, S).transpose(0, 1)


def moba_attention_varlen(q, k, v, cu_seqlens, max_seqlen, block_size, top_k, scale):
    """q [T, Hq, D], k, v [T, Hkv, D], cu_seqlens [n + 1] -> o [T, Hq, D], lse float32 [Hq, T]."""
    bounds = cu_seqlens.tolist()
    lengths = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    return _run(q, k, v, lengths, block_size, top_k, scale)
