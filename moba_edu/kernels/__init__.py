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

# The rung (api.py's contract): moba_attention, moba_attention_varlen, unsupported.
# Submodules import triton, so they are loaded only when a kernel runs.

warn_interpreter = True
"""Warn once per process when impl="triton" runs under the interpreter; set False to stay quiet."""

MAX_HEAD_DIM = 256  # past 128 the launch configs halve the tiles (moba_fwd, moba_bwd, router `launch_config`)


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


def warn_if_interpreted(stacklevel: int) -> None:
    """Under the interpreter, warn (once per process, while `warn_interpreter`) that calls are slow.
    `stacklevel` as `warnings.warn` counts it from this function. Silent while torch.compile traces
    (Dynamo cannot trace `warnings.warn`; the warning comes from an eager call instead)."""
    global warn_interpreter
    if INTERPRET and warn_interpreter and not torch.compiler.is_compiling():
        warn_interpreter = False
        warnings.warn("impl='triton' runs under Triton's CPU interpreter here (no CUDA GPU): seconds per call "
                      "even at small shapes; impl='torch' is the fast rung on a CPU", stacklevel=stacklevel)


def _run(q, k, v, lengths, block_size, top_k, scale):
    """o (q's layout and dtype), lse float32 [Hq, T], differentiable: op.py's operator."""
    from .op import moba

    return moba(q, k, v, lengths, block_size, top_k, scale)


def moba_attention(q, k, v, block_size, top_k, scale):
    """q [B, Hq, S, D], k, v [B, Hkv, S, D] -> o [B, Hq, S, D], lse float32 [B, Hq, S]."""
    B, Hq, S, _ = q.shape
    o, lse = _run(q, k, v, (S,) * B, block_size, top_k, scale)
    return o, lse.view(Hq, B, S).transpose(0, 1)


def moba_attention_varlen(q, k, v, cu_seqlens, block_size, top_k, scale):
    """q [T, Hq, D], k, v [T, Hkv, D], cu_seqlens [n + 1] -> o [T, Hq, D], lse float32 [Hq, T]."""
    bounds = cu_seqlens.tolist()
    lengths = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    return _run(q, k, v, lengths, block_size, top_k, scale)
