"""The differentiable Triton MoBA: forward and backward kernels as two torch.library custom operators.

`moba_edu::moba_fwd` runs the router and the forward kernels (moba_fwd.py); `moba_edu::moba_bwd` runs
the backward kernels (moba_bwd.py); `register_autograd` ties them together. Registered operators
behave like built-in ones: autograd differentiates them, `torch.no_grad` and inputs that do not
require grad skip the saving, and `torch.compile(fullgraph=True)` puts each call in its graph as one
node, using the fake implementations below for shapes.

Why `custom_op` and not `triton_op`. `torch.library.triton_op` (torch >= 2.6) lets the compiler see
the Triton kernels, but it traces the operator's body with FakeTensors, which carry shapes and no
data. Our host code reads data: the router's tables come from the sequence lengths and the chunk
boundaries from a prefix sum, both read back with `int()` (layout.layout, router.schedule), so the
body cannot be traced. A custom op is opaque: the compiler calls it and never looks inside, which is
all this rung needs (its kernels are launched as they are, and nothing around them fuses with them).

What the backward saves (`setup_context`): q, k, v and o, which exist anyway (the caller holds the
inputs, the next layer the output; saving them copies nothing); the forward's log-sum-exp, float32
[Hq, T]; and its routing, int32 [Hq, T, R] with R = top_k - 1 routed blocks per query. Beyond tensors
that already exist that is (1 + R) * 4 bytes per (query, head): 25 MB at T = 128K, Hq = 16, R = 2,
against 512 MB for o in bfloat16. The block-major pair lists are rebuilt from the routing in the
backward (two small kernels) instead of being kept alive between the passes.

The log-sum-exp is differentiable too: d lse_t / d s_tj = P_tj, so a gradient g_t on lse adds P_tj g_t
to dS_tj, which is dS's formula with Delta_t replaced by Delta_t - g_t (moba_bwd.moba_backward).
"""

import torch

from . import INTERPRET
from .layout import layout
from .moba_bwd import moba_backward
from .moba_fwd import moba_forward


def _routed_slots(lengths: list[int], block_size: int, top_k: int) -> int:
    """R for the fake implementation, from shapes alone (layout.Layout.routed_slots, without tables)."""
    most_blocks = max((-(-n // block_size) for n in lengths), default=0)
    return max(0, min(top_k - 1, most_blocks - 1))


@torch.library.custom_op("moba_edu::moba_fwd", mutates_args=())
def moba_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], block_size: int, top_k: int,
             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, Hq, S, D] (lengths = [S] * B) or [T, Hq, D]; k, v with Hkv heads; last dims contiguous.
    Returns o (q's layout, contiguous), lse float32 [Hq, T], routed int32 [Hq, T, R]."""
    o, lse, sched = moba_forward(q, k, v, tuple(lengths), block_size, top_k, scale)
    return o, lse, sched.routed


@moba_fwd.register_fake
def _(q, k, v, lengths, block_size, top_k, scale):
    T, Hq = sum(lengths), q.shape[1]
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(Hq, T, dtype=torch.float32),
            q.new_empty(Hq, T, _routed_slots(lengths, block_size, top_k), dtype=torch.int32))


@torch.library.custom_op("moba_edu::moba_bwd", mutates_args=())
def moba_bwd(do: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             o: torch.Tensor, lse: torch.Tensor, routed: torch.Tensor, lengths: list[int], block_size: int,
             scale: float, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (each in its input's layout, contiguous) from the output gradient do (o's shape) and
    an optional gradient dlse [Hq, T] on the log-sum-exp."""
    lay = layout(tuple(lengths), block_size, q.device, q.dim() == 4)
    return moba_backward(do, q, k, v, o, lse, routed, lay, scale, deterministic=deterministic, dlse=dlse)


@moba_bwd.register_fake
def _(do, dlse, q, k, v, o, lse, routed, lengths, block_size, scale, deterministic):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, lengths, block_size, top_k, scale = inputs
    o, lse, routed = output
    ctx.save_for_backward(q, k, v, o, lse, routed)
    ctx.lengths, ctx.block_size, ctx.scale = lengths, block_size, scale


def _backward(ctx, do, dlse, _drouted):
    q, k, v, o, lse, routed = ctx.saved_tensors
    do = do if do.stride(-1) == 1 else do.contiguous()  # e.g. the stride-0 gradient of o.sum()
    dq, dk, dv = moba_bwd(do, dlse, q, k, v, o, lse, routed, ctx.lengths, ctx.block_size, ctx.scale,
                          torch.are_deterministic_algorithms_enabled())
    return dq, dk, dv, None, None, None, None


moba_fwd.register_autograd(_backward, setup_context=_setup_context)


def moba(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: tuple, block_size: int, top_k: int,
         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable MoBA by the Triton kernels: o (q's layout and dtype) and lse float32 [Hq, T].

    q [B, Hq, S, D] (lengths = (S,) * B) or [T, Hq, D] (lengths of the packed sequences); k, v with Hkv
    heads; any strides (the last dim is made contiguous, differentiably). bfloat16 under the
    interpreter is computed in float32 (the interpreter's bf16 arithmetic is wrong, triton #11584).
    """
    dtype = q.dtype
    if INTERPRET and dtype == torch.bfloat16:
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    o, lse, _ = moba_fwd(q, k, v, list(lengths), block_size, top_k, scale)
    return o.to(dtype), lse
