"""GPU suites of the MoBA backward (issue 5), registered in bench.py: `python -m moba_edu.bench --gpu
--only "moba_fwd_bwd/*"`; JSON under figures/bench/h200/.

moba_fwd_bwd  forward + backward of impl="triton" against dense causal SDPA forward + backward (cuDNN
              and FlashAttention-2 backends, same process): B = 1, head dim 128, bf16; S in 8K, 32K,
              128K; (block_size, top_k) in (512, 3), (128, 8), (4096, 12); grouped 32 / 8 heads at
              32K and 128K (dense on repeated k, v: the same FLOPs). Target: 12x cuDNN at 128K, (512, 3).
              Per point: forward, backward (total - forward) and total times; density; the backward's
              floor (its useful FLOPs, 5 matmuls per attended (query, key) pair, at the measured bf16
              rate, or its bytes at the measured copy bandwidth, whichever is larger); the FLOPs the
              kernels really do (own-block dQ is recomputed, routed dQ is added by atomics); peak
              memory of forward + backward beyond q, k, v, o and their gradients.
bwd_tiles     the backward alone at S = 32K, (512, 3), 16 heads, for a few tile shapes, each checked
              against the default's gradients: the sweep that chose moba_bwd.launch_config.

Times are medians of `triton.testing.do_bench`, or of three CUDA-event-timed calls where one call
takes over 50 ms (dense attention at 128K), to spend little of a GPU lease.
"""

from __future__ import annotations

from pathlib import Path

import torch

HEAD_DIM = 128
SIZES = (8192, 32768, 131072)
CONFIGS = ((512, 3), (128, 8), (4096, 12))
GROUPED = ((32, 8), (32768, 131072))
TARGET = dict(S=131072, block_size=512, top_k=3, speedup=12.0)
TILES = tuple(dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)
              for m, n, w, st in ((32, 128, 8, 2), (64, 128, 8, 2), (32, 128, 8, 3), (16, 128, 8, 2), (64, 64, 4, 2)))


def timed_ms(fn, grad_to_none=None) -> float:
    """Median time of fn in ms: do_bench, or three CUDA-event calls for calls over 50 ms."""
    import triton.testing

    from .bench import event_ms  # bench.py imports this module: import at call time

    if event_ms(fn, calls=1) < 50:
        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    return event_ms(fn, calls=3)


_ceilings: dict = {}


def ceilings() -> dict:
    """Measured copy bandwidth (bytes read + written) and bf16 matrix rate, once per process."""
    if not _ceilings:
        x = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)
        y = torch.empty_like(x)
        copy_ms = timed_ms(lambda: y.copy_(x))
        a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        mm_ms = timed_ms(lambda: a @ b)
        _ceilings.update(copy_bytes_per_s=4 * x.numel() / copy_ms * 1e3, bf16_flops=2 * 8192**3 / mm_ms * 1e3)
    return _ceilings


def qkv(S: int, Hq: int, Hkv: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda h: torch.randn(1, h, S, HEAD_DIM, device="cuda", generator=gen).bfloat16()  # noqa: E731
    return make(Hq), make(Hkv), make(Hkv), make(Hq)


def fwd_bwd_ms(forward, leaves, do) -> dict:
    """Forward, forward + backward and (their difference) backward times of `forward(*leaves)`."""
    for x in leaves:
        x.requires_grad_()

    def both():
        forward(*leaves).backward(do)

    fwd = timed_ms(lambda: forward(*leaves))
    total = timed_ms(both, grad_to_none=leaves)
    return dict(fwd_ms=fwd, fwd_bwd_ms=total, bwd_ms=total - fwd)


_dense_cache: dict = {}


def dense(S: int, Hq: int, Hkv: int) -> dict:
    """Dense causal SDPA forward + backward with the cuDNN and FlashAttention-2 backends (cached per shape)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    key = (S, Hq, Hkv)
    if key not in _dense_cache:
        q, k, v, do = qkv(S, Hq, Hkv, seed=1)
        k, v = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
        result = {}
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            with sdpa_kernel(backend):
                times = fwd_bwd_ms(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True), [q, k, v], do)
            result.update({f"{name}_{key}": value for key, value in times.items()})
        _dense_cache[key] = result
    return _dense_cache[key]


def pair_counts(routed: torch.Tensor, S: int, block_size: int) -> dict:
    """Attended (query, key) pairs of the own blocks and of the routed blocks, summed over heads."""
    Hq = routed.shape[0]
    pos = torch.arange(S, device=routed.device, dtype=torch.float64)
    own = float((pos % block_size + 1).sum()) * Hq
    routed_pairs = float((routed >= 0).sum()) * block_size
    return dict(own_pairs=own, routed_pairs=routed_pairs, density=(own + routed_pairs) / (Hq * S * (S + 1) / 2))


def _fwd_bwd_points():
    points = [(f"S{S}_bs{bs}_k{k}_h16x16", dict(S=S, Hq=16, Hkv=16, block_size=bs, top_k=k))
              for S in SIZES for bs, k in CONFIGS]
    (Hq, Hkv), sizes = GROUPED
    return points + [(f"S{S}_bs512_k3_h{Hq}x{Hkv}", dict(S=S, Hq=Hq, Hkv=Hkv, block_size=512, top_k=3))
                     for S in sizes]


def _measure_fwd_bwd(params: dict, out_dir: Path) -> dict:
    import moba_edu as me
    from moba_edu.kernels.op import moba_fwd

    S, Hq, Hkv, bs, top_k = (params[key] for key in ("S", "Hq", "Hkv", "block_size", "top_k"))
    ceil = ceilings()
    q, k, v, do = qkv(S, Hq, Hkv)
    with torch.no_grad():
        routed = moba_fwd(q, k, v, [S], bs, top_k, HEAD_DIM ** -0.5)[2]
    pairs = pair_counts(routed, S, bs)
    del routed
    moba = fwd_bwd_ms(lambda q, k, v: me.moba_attention(q, k, v, block_size=bs, top_k=top_k, impl="triton"),
                      [q, k, v], do)
    for x in (q, k, v):
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    me.moba_attention(q, k, v, block_size=bs, top_k=top_k, impl="triton").backward(do)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    expected = 2 * (2 * q.numel() + 2 * k.numel())   # bf16 o, dq, dk, dv: what any attention allocates
    del q, k, v, do
    torch.cuda.empty_cache()
    attended = pairs["own_pairs"] + pairs["routed_pairs"]
    useful_flops = 10 * HEAD_DIM * attended          # dV, dP, S, dK, dQ: five [pair] x D matmuls, 2 FLOPs each
    kernel_flops = 8 * HEAD_DIM * attended + 2 * HEAD_DIM * pairs["routed_pairs"] + 6 * HEAD_DIM * pairs["own_pairs"]
    min_bytes = 2 * HEAD_DIM * S * (4 * Hq + 4 * Hkv)  # read q, o, do, k, v; write dq, dk, dv (bf16); lse, Delta
    floor_ms = 1e3 * max(useful_flops / ceil["bf16_flops"], min_bytes / ceil["copy_bytes_per_s"])
    record = dict(shape=dict(B=1, Hq=Hq, Hkv=Hkv, S=S, D=HEAD_DIM), dtype="bfloat16", block_size=bs, top_k=top_k,
                  **{"pass": "forward + backward"}, **pairs, **{f"moba_{key}": value for key, value in moba.items()},
                  **dense(S, Hq, Hkv), bwd_useful_flops=useful_flops, bwd_kernel_flops=kernel_flops,
                  bwd_min_bytes=min_bytes, bwd_floor_ms=floor_ms, bwd_over_floor=moba["bwd_ms"] / floor_ms,
                  bwd_tflops=useful_flops / moba["bwd_ms"] / 1e9, peak_extra_bytes=peak - expected,
                  ceilings=dict(ceil))
    for name in ("cudnn", "flash"):
        record[f"speedup_fwd_bwd_vs_{name}"] = record[f"{name}_fwd_bwd_ms"] / moba["fwd_bwd_ms"]
        record[f"speedup_bwd_vs_{name}"] = record[f"{name}_bwd_ms"] / moba["bwd_ms"]
    record["density_bound_fwd_bwd_speedup"] = 1 / pairs["density"]
    return record


def _measure_tiles(params: dict, out_dir: Path) -> dict:
    from moba_edu.kernels.moba_bwd import launch_config, moba_backward
    from moba_edu.kernels.op import moba_fwd
    from moba_edu.kernels.layout import layout

    S, bs, top_k = params["S"], params["block_size"], params["top_k"]
    q, k, v, do = qkv(S, params["Hq"], params["Hkv"])
    with torch.no_grad():
        o, lse, routed = moba_fwd(q, k, v, [S], bs, top_k, HEAD_DIM ** -0.5)
    lay = layout((S,), bs, q.device, True)

    def run(config=None):
        return moba_backward(do, q, k, v, o, lse, routed, lay, HEAD_DIM ** -0.5, config=config)

    reference = run()
    rows = []
    for config in TILES:
        try:
            grads = run(config)
            err = max(float((g.float() - r.float()).norm() / r.float().norm()) for g, r in zip(grads, reference))
            rows.append(dict(config=config, bwd_ms=timed_ms(lambda: run(config)), rel_err_vs_default=err))
        except Exception as exc:   # e.g. out of shared memory: record it, try the next shape
            rows.append(dict(config=config, error=f"{type(exc).__name__}: {exc}"[:300]))
    return dict(shape=dict(B=1, Hq=params["Hq"], Hkv=params["Hkv"], S=S, D=HEAD_DIM), block_size=bs, top_k=top_k,
                default=launch_config(HEAD_DIM), tiles=rows)


def _plot_fwd_bwd(records: list[dict], out_dir: Path) -> list[Path]:
    """Speed-up of MoBA forward + backward over dense cuDNN and FlashAttention-2, per configuration
    and S, with the density bound; and the backward's time over its floor."""
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_floor) = plt.subplots(1, 2, figsize=(13, 4.6))
    groups = sorted({(r["block_size"], r["top_k"], r["shape"]["Hq"], r["shape"]["Hkv"]) for r in records})
    for i, (bs, top_k, Hq, Hkv) in enumerate(groups):
        rs = sorted((r for r in records if (r["block_size"], r["top_k"], r["shape"]["Hq"], r["shape"]["Hkv"]) ==
                     (bs, top_k, Hq, Hkv)), key=lambda r: r["shape"]["S"])
        S = [r["shape"]["S"] for r in rs]
        label = f"({bs}, {top_k}), {Hq}/{Hkv} heads"
        ax_speed.plot(S, [r["speedup_fwd_bwd_vs_cudnn"] for r in rs], color=f"C{i}", label=f"{label} vs cuDNN")
        ax_speed.plot(S, [r["density_bound_fwd_bwd_speedup"] for r in rs], ls=":", color=f"C{i}", lw=1)
        ax_floor.plot(S, [r["bwd_over_floor"] for r in rs], color=f"C{i}", label=label)
        for s, r in zip(S, rs):
            older = "measured_with" in r   # an earlier kernel version (the JSON says which): open marker
            style = dict(marker="o", color=f"C{i}", mfc="none" if older else f"C{i}")
            ax_speed.plot([s], [r["speedup_fwd_bwd_vs_cudnn"]], **style)
            ax_floor.plot([s], [r["bwd_over_floor"]], **style)
            ax_speed.annotate(f"{r['speedup_fwd_bwd_vs_cudnn']:.3g}x", (s, r["speedup_fwd_bwd_vs_cudnn"]),
                              textcoords="offset points", xytext=(-14, 4 - 9 * i), ha="right", fontsize=7,
                              color=f"C{i}")
    ax_speed.plot([TARGET["S"]], [TARGET["speedup"]], marker="*", ms=12, color="k", ls="none",
                  label=f"target: {TARGET['speedup']:g}x at {TARGET['S'] // 1024}K, (512, 3)")
    ax_speed.set(ylabel="cuDNN time / MoBA time (fwd + bwd)", yscale="log",
                 title="MoBA forward + backward vs dense causal cuDNN (dotted: 1 / density)")
    ax_floor.set(ylabel="backward time / its floor", yscale="log", title="MoBA backward against its floor")
    for ax in (ax_speed, ax_floor):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length S (tokens)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    machine = records[0]["machine"]
    fig.suptitle(f"{machine.get('gpu', '?')}, bf16, head dim {HEAD_DIM}, B = 1; torch {machine['torch']}, "
                 f"triton {machine['triton']}; open markers: measured with an earlier kernel version", fontsize=10)
    fig.tight_layout()
    path = out_dir / "h200_moba_fwd_bwd.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def suites(Suite) -> dict:
    """The GPU suites of this file, as bench.py's `Suite` objects."""
    return {"moba_fwd_bwd": Suite("moba_fwd_bwd", "gpu", _fwd_bwd_points, _measure_fwd_bwd, _plot_fwd_bwd),
            "bwd_tiles": Suite("bwd_tiles", "gpu", lambda: [("S32768_bs512_k3_h16x16",
                                                             dict(S=32768, Hq=16, Hkv=16, block_size=512, top_k=3))],
                               _measure_tiles, lambda records, out_dir: [])}
