"""Where the time goes: `python -m moba_edu.bench --gpu --only kernel_split`.

kernel_split  per-kernel GPU time of impl="triton" (torch.profiler, CUDA activity, the mean of three
              calls after a warm-up), forward alone and forward + backward, at the points the
              performance goals name: S = 32K and 128K with (512, 3), 128K and 512K with (128, 8), 1M
              with (4096, 12) (forward only past 128K). B = 1, 16 heads, head dim 128, bf16. Beside the
              kernels, the call's do_bench time: what the kernels' sum leaves out is launch and host
              time between them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .harness import GPU_HEAD_DIM, Suite, gpu_ms, moba_point, qkv, register

POINTS = ((32768, 512, 3), (131072, 512, 3), (131072, 128, 8), (524288, 128, 8), (1048576, 4096, 12))
BACKWARD_MAX_S = 131072


def kernel_ms(fn, calls: int = 3) -> dict[str, float]:
    """{kernel name: GPU ms per call of fn}, largest first, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        if event.self_device_time_total > 0:     # microseconds over all calls
            times[event.key] = event.self_device_time_total / 1000 / calls
    return dict(sorted(times.items(), key=lambda item: -item[1]))


def measure(params: dict, out_dir: Path) -> dict:
    import moba_edu as me

    S, bs, top_k = params["S"], params["block_size"], params["top_k"]
    q, k, v, do = qkv(S, params["Hq"], params["Hkv"], grad_out=True)
    call = lambda: me.moba_attention(q, k, v, block_size=bs, top_k=top_k, impl="triton")  # noqa: E731
    record = dict(shape=dict(B=1, Hq=params["Hq"], Hkv=params["Hkv"], S=S, D=GPU_HEAD_DIM), dtype="bfloat16",
                  block_size=bs, top_k=top_k)
    with torch.no_grad():
        record["forward_kernels_ms"] = kernel_ms(call)
        record["forward_ms"] = gpu_ms(call)
    if S <= BACKWARD_MAX_S:
        for x in (q, k, v):
            x.requires_grad_()

        def both():
            for x in (q, k, v):
                x.grad = None                 # as a training step: no add into the previous call's grads
            call().backward(do)

        record["fwd_bwd_kernels_ms"] = kernel_ms(both)
        record["fwd_bwd_ms"] = gpu_ms(both, grad_to_none=[q, k, v])
    for key in ("forward", "fwd_bwd"):
        if f"{key}_kernels_ms" in record:
            kernels = record[f"{key}_kernels_ms"]
            print(f"  {key}: {record[f'{key}_ms']:.4g} ms (kernels {sum(kernels.values()):.4g}): "
                  + ", ".join(f"{name[:40]} {ms:.3g}" for name, ms in list(kernels.items())[:8]), flush=True)
    return record


register(Suite("kernel_split", "gpu", lambda: [moba_point(S, 16, 16, bs, k) for S, bs, k in POINTS], measure))
