"""GPU suites of the MoBA backward: `python -m moba_edu.bench --gpu --only "moba_fwd_bwd"`.

moba_fwd_bwd  forward + backward of impl="triton" against dense causal SDPA forward + backward (cuDNN
              and FlashAttention-2 backends, same process): B = 1, head dim 128, bf16; S in 8K, 32K,
              128K; (block_size, top_k) in (512, 3), (128, 8), (4096, 12); grouped 32 / 8 heads at
              32K and 128K (dense on repeated k, v: the same FLOPs); and the long points LONG, 512K
              (128, 8) and 1M (4096, 12), against cuDNN alone, MoBA and cuDNN each one CUDA-event call
              after a warm-up (the dense 1M forward + backward takes about half a minute per call).
              Per point: forward, backward (total - forward) and total times; density; the backward's
              floor (`cost.backward_cost`: its useful FLOPs at the measured bf16 rate, or its bytes at
              the measured copy bandwidth, whichever is larger); the FLOPs the kernels really do; peak
              memory of forward + backward beyond q, k, v, o and their gradients.
moba_bwd_hdim forward + backward at head dims 192 and 256 (gpu_forward's head_dim_points: S = 32K
              and 128K, (512, 3), 16 heads) against dense causal SDPA forward + backward at the same head
              dim (a backend that does not take it: `<backend>_error`).
bwd_tiles     the backward alone at 32K (512, 3), 128K (512, 3) and (128, 8), 16 heads, for a few tile
              shapes, each checked against the first's gradients: the sweep that chose moba_bwd.launch_config.
bwd_dq        the backward alone with the routed dQ by atomic adds and per slot (a few tiles of the
              per-slot kernel), and in deterministic mode, at 32K and 128K for each configuration
              (128K (4096, 12) left out: half a second per call), each checked against the atomic
              path's gradients: the sweep that chose launch_config's DQ and dq_routed.

The backward goal of the project (`BACKWARD_GOAL`): forward + backward at 128K with (512, 3) at least
12x faster than cuDNN's. Times are `harness.gpu_ms`: do_bench medians, or three CUDA-event calls
where one call takes over 50 ms (dense attention at 128K), to spend little of a GPU lease.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import cost
from .floors import ceilings, floor_ms
from .gpu_forward import head_dim_points
from .harness import GPU_HEAD_DIM, Suite, cuda_peak_bytes, gpu_ms, moba_point, qkv, register, sdpa_backends

SIZES = (8192, 32768, 131072)
LONG = ((524288, 128, 8), (1048576, 4096, 12))   # (S, block_size, top_k)
CONFIGS = ((512, 3), (128, 8), (4096, 12))
GROUPED = ((32, 8), (32768, 131072))
BACKWARD_GOAL = dict(S=131072, block_size=512, top_k=3, speedup=12.0)
TILES = tuple(dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)
              for m, n, w, st in ((32, 128, 8, 2), (64, 128, 8, 2), (32, 128, 8, 3), (16, 128, 8, 2), (64, 64, 4, 2),
                                  (32, 64, 4, 2), (64, 64, 4, 3)))


def fwd_bwd_ms(forward, leaves, do, calls: int = 3) -> dict:
    """Forward, forward + backward and (their difference) backward times of `forward(*leaves)`, in ms
    (`calls`: CUDA-event calls where one takes seconds, harness.gpu_ms)."""
    for x in leaves:
        x.requires_grad_()

    def both():
        forward(*leaves).backward(do)

    fwd = gpu_ms(lambda: forward(*leaves), calls=calls)
    total = gpu_ms(both, grad_to_none=leaves, calls=calls)
    return dict(fwd_ms=fwd, fwd_bwd_ms=total, bwd_ms=total - fwd)


_dense_cache: dict = {}


def dense(S: int, Hq: int, Hkv: int, head_dim: int = GPU_HEAD_DIM) -> dict:
    """Dense causal SDPA forward + backward with the cuDNN and FlashAttention-2 backends (cached per shape;
    harness.sdpa_backends: `<backend>_error` where one does not take the shape). Past 128K, cuDNN alone
    and one timed call of each pass after its warm-up."""
    shape = (S, Hq, Hkv, head_dim)
    if shape not in _dense_cache:
        q, k, v, do = qkv(S, Hq, Hkv, seed=1, grad_out=True, head_dim=head_dim)
        k, v = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
        long = S > max(SIZES)
        _dense_cache[shape] = sdpa_backends(lambda: fwd_bwd_ms(
            lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v], do,
            calls=1 if long else 3), names=("cudnn",) if long else ("cudnn", "flash"))
    return _dense_cache[shape]


def fwd_bwd_points() -> list[tuple[str, dict]]:
    shapes = [(S, 16, 16, bs, k) for S in SIZES for bs, k in CONFIGS]
    (Hq, Hkv), sizes = GROUPED
    shapes += [(S, Hq, Hkv, 512, 3) for S in sizes]
    shapes += [(S, 16, 16, bs, k) for S, bs, k in LONG]
    return [moba_point(*shape) for shape in shapes]


def measure_fwd_bwd(params: dict, out_dir: Path) -> dict:
    import moba_edu as me
    from moba_edu.kernels.op import moba_fwd

    S, Hq, Hkv, bs, top_k = (params[key] for key in ("S", "Hq", "Hkv", "block_size", "top_k"))
    ceil = ceilings(out_dir)
    q, k, v, do = qkv(S, Hq, Hkv, grad_out=True)
    with torch.no_grad():
        routed = moba_fwd(q, k, v, [S], bs, top_k, GPU_HEAD_DIM ** -0.5)[2]
    counts = cost.routed_pair_counts(routed, S, bs)
    del routed
    moba = fwd_bwd_ms(lambda q, k, v: me.moba_attention(q, k, v, block_size=bs, top_k=top_k, impl="triton"),
                      [q, k, v], do, calls=1 if S > max(SIZES) else 3)
    for x in (q, k, v):
        x.grad = None
    peak = cuda_peak_bytes(lambda: me.moba_attention(q, k, v, block_size=bs, top_k=top_k, impl="triton").backward(do))
    expected = 2 * (2 * q.numel() + 2 * k.numel())   # bf16 o, dq, dk, dv: what any attention allocates
    del q, k, v, do
    torch.cuda.empty_cache()
    work = cost.backward_cost(Hq, Hkv, S, GPU_HEAD_DIM, counts["own_pairs"], counts["routed_pairs"])
    floor = floor_ms(ceil, nbytes=work["min_bytes"], flops=work["useful_flops"], rate="bf16")
    record = dict(shape=dict(B=1, Hq=Hq, Hkv=Hkv, S=S, D=GPU_HEAD_DIM), dtype="bfloat16", block_size=bs, top_k=top_k,
                  **{"pass": "forward + backward"}, **counts, **{f"moba_{key}": value for key, value in moba.items()},
                  **dense(S, Hq, Hkv), bwd_useful_flops=work["useful_flops"], bwd_kernel_flops=work["kernel_flops"],
                  bwd_min_bytes=work["min_bytes"], bwd_floor_ms=floor, bwd_over_floor=moba["bwd_ms"] / floor,
                  bwd_tflops=work["useful_flops"] / moba["bwd_ms"] / 1e9, peak_extra_bytes=peak - expected,
                  ceilings={key: ceil[key] for key in ("copy_bytes_per_s", "bf16_flops_per_s")})
    for name in ("cudnn", "flash")[:1 if S > max(SIZES) else 2]:
        record[f"speedup_fwd_bwd_vs_{name}"] = record[f"{name}_fwd_bwd_ms"] / moba["fwd_bwd_ms"]
        record[f"speedup_bwd_vs_{name}"] = record[f"{name}_bwd_ms"] / moba["bwd_ms"]
    record["density_bound_fwd_bwd_speedup"] = 1 / counts["density"]
    return record


def plot_fwd_bwd(records: list[dict], out_dir: Path) -> list[Path]:
    """Speed-up of MoBA forward + backward over dense cuDNN per configuration and S, with the density
    bound and the goal; and the backward's time over its floor."""
    import matplotlib.pyplot as plt

    from .plots import gpu_title, label_points, plain_log_y, s_axes, save

    fig, (ax_speed, ax_floor) = plt.subplots(1, 2, figsize=(13, 4.8))
    groups = sorted({(r["block_size"], r["top_k"], r["shape"]["Hq"], r["shape"]["Hkv"]) for r in records})
    labels = []
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
            labels.append((s, r["speedup_fwd_bwd_vs_cudnn"], f"{r['speedup_fwd_bwd_vs_cudnn']:.3g}x", f"C{i}"))
    goal = BACKWARD_GOAL
    ax_speed.plot([goal["S"]], [goal["speedup"]], marker="*", ms=12, color="k", ls="none",
                  label=f"target: {goal['speedup']:g}x at {goal['S'] // 1024}K, ({goal['block_size']}, {goal['top_k']})")
    ax_speed.set(ylabel="cuDNN time / MoBA time (fwd + bwd)", yscale="log",
                 title="MoBA forward + backward vs dense causal cuDNN\n(dotted: 1 / density, the most skipping work can give)")
    plain_log_y(ax_speed, [0.25, 0.5, 1, 2, 5, 10, 20, 50])
    ax_floor.set(ylabel="backward time / its floor (x)", ylim=(0, None),
                 title="MoBA backward: how far from the fastest it could be")
    s_axes(ax_speed, ax_floor)
    for ax in (ax_speed, ax_floor):   # room right of the last points for their labels
        low, high = ax.get_xlim()
        ax.set_xlim(low, high * 1.6)
    label_points(ax_speed, labels)
    fig.suptitle(gpu_title(records, "MoBA forward + backward") + "; open markers: measured with an earlier kernel "
                 "version", fontsize=10)
    fig.text(0.53, 0.015, "the backward's floor: the time for its useful matrix products (5 per attended pair) at the\n"
             "measured bf16 rate, or to move q, k, v, o and their gradients at full memory speed, whichever is longer",
             fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save(fig, out_dir / "h200_moba_fwd_bwd.png")


register(Suite("moba_fwd_bwd", "gpu", fwd_bwd_points, measure_fwd_bwd, plot_fwd_bwd))


def measure_head_dim(params: dict, out_dir: Path) -> dict:
    """Forward + backward of impl="triton" at one head dim, against dense causal SDPA at that head dim."""
    import moba_edu as me
    from moba_edu.kernels.moba_bwd import launch_config

    S, Hq, Hkv, bs, top_k, D = (params[key] for key in ("S", "Hq", "Hkv", "block_size", "top_k", "D"))
    q, k, v, do = qkv(S, Hq, Hkv, grad_out=True, head_dim=D)
    moba = fwd_bwd_ms(lambda q, k, v: me.moba_attention(q, k, v, block_size=bs, top_k=top_k, impl="triton"),
                      [q, k, v], do)
    del q, k, v, do
    torch.cuda.empty_cache()
    record = dict(shape=dict(B=1, Hq=Hq, Hkv=Hkv, S=S, D=D), dtype="bfloat16", block_size=bs, top_k=top_k,
                  **{"pass": "forward + backward"}, **{f"moba_{key}": value for key, value in moba.items()},
                  launch_config=launch_config(D), **dense(S, Hq, Hkv, D))
    for name in ("cudnn", "flash"):
        if f"{name}_fwd_bwd_ms" in record:
            record[f"speedup_fwd_bwd_vs_{name}"] = record[f"{name}_fwd_bwd_ms"] / moba["fwd_bwd_ms"]
            record[f"speedup_bwd_vs_{name}"] = record[f"{name}_bwd_ms"] / moba["bwd_ms"]
    print(f"  D={D}: moba fwd+bwd {moba['fwd_bwd_ms']:.4g} ms, "
          + ", ".join(f"{n} {record.get(f'{n}_fwd_bwd_ms', 'n/a')}" for n in ("cudnn", "flash")), flush=True)
    return record


register(Suite("moba_bwd_hdim", "gpu", head_dim_points, measure_head_dim))


def backward_sweep(params: dict, key: str, variants: list[dict]) -> dict:
    """The backward alone (moba_backward given one forward's o, lse and routing) for each variant's keyword
    arguments, timed and checked against the first variant's gradients; a variant that fails (e.g. out
    of shared memory) is recorded with its error. The rows go under `key`."""
    from moba_edu.kernels.layout import layout
    from moba_edu.kernels.moba_bwd import launch_config, moba_backward
    from moba_edu.kernels.op import moba_fwd

    S, bs, top_k = params["S"], params["block_size"], params["top_k"]
    q, k, v, do = qkv(S, params["Hq"], params["Hkv"], grad_out=True)
    with torch.no_grad():
        o, lse, routed = moba_fwd(q, k, v, [S], bs, top_k, GPU_HEAD_DIM ** -0.5)
    lay = layout((S,), bs, q.device, True)

    def run(config=None, deterministic=False):
        return moba_backward(do, q, k, v, o, lse, routed, lay, GPU_HEAD_DIM ** -0.5, config=config,
                             deterministic=deterministic)

    reference = run(**variants[0])
    rows = []
    for variant in variants:
        try:
            grads = run(**variant)
            err = max(float((g.float() - r.float()).norm() / r.float().norm()) for g, r in zip(grads, reference))
            rows.append(dict(variant, bwd_ms=gpu_ms(lambda: run(**variant)), rel_err_vs_first=err))
        except Exception as exc:
            rows.append(dict(variant, error=f"{type(exc).__name__}: {exc}"[:300]))
        print(f"  {rows[-1]}", flush=True)
    return dict(shape=dict(B=1, Hq=params["Hq"], Hkv=params["Hkv"], S=S, D=GPU_HEAD_DIM), block_size=bs, top_k=top_k,
                default=launch_config(GPU_HEAD_DIM, bs), **{key: rows})


register(Suite("bwd_tiles", "gpu", lambda: [moba_point(S, 16, 16, bs, k) for S, bs, k in
                                             ((32768, 512, 3), (131072, 512, 3), (131072, 128, 8))],
               lambda params, out_dir: backward_sweep(params, "tiles", [dict(config=c) for c in TILES])))

DQ_TILES = ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2), (64, 32, 4, 2))


def measure_dq(params: dict, out_dir: Path) -> dict:
    variants = [dict(config=dict(DQ="atomic"))]
    variants += [dict(config=dict(DQ="slots", dq_routed=dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)))
                 for m, n, w, st in DQ_TILES]
    return backward_sweep(params, "variants", variants + [dict(deterministic=True)])


register(Suite("bwd_dq", "gpu", lambda: [moba_point(S, 16, 16, bs, k) for S in (32768, 131072) for bs, k in CONFIGS
                                          if (S, bs) != (131072, 4096)], measure_dq))
