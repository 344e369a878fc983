"""GPU suite `decode`: one decoded token, Triton MoBA decode against SDPA's dense decode (docs/design.md §2a, §6).

`python -m moba_edu.bench --gpu --only "decode/*"`. A point is one query token per sequence and head
(s = 1, the last token of a full cache) at a cache of S tokens: S in 32K, 128K, 512K, 1M;
(block_size, top_k) in (512, 3), (128, 8), (4096, 12); B = 1 with 16 query / 16 key-value heads, and
B = 8 with 32 / 8 (grouped); head dim 128, bf16. Named `S131072-bs512-k3-h16x16-B1`.

Timed (do_bench medians, in one process): `moba_decode(impl="triton")`, host work included (it is part
of every step), and `scaled_dot_product_attention` of the same query over the same keys and values in
SDPA's [B, H, S, D] layout (grouped heads by `enable_gqa`, not repeated), with the cuDNN and the
FlashAttention backends; a backend that refuses the shape is recorded as skipped, with its reason.

A decoding step is bound by memory, not arithmetic (notebook 09): dense attention reads every cached
key and value once; MoBA reads one float32 mean per full block (to route), then the pages it routed
to. Its floor is the bytes it must read over the copy bandwidth measured by `floors.py`: the means plus
the distinct pages chosen by the step's own routing (`pages_read`: with grouped heads the query heads
of a group may choose different pages; `decode_bytes` counts the case where they agree). A point is
launch-bound where its floor is below the fixed cost of a step (`step_overhead_ms`: the same call on a
cache of two tiny blocks); there the floor goal does not apply.

Memory: every cache is built once per point by bulk `append`s of 64K tokens from dense keys and values
that are kept (drawn once per shape and length, shared by its three configurations and by SDPA). B = 8 at 1M
tokens is 8 x 1M x 8 heads x 128 x 2 bytes x 2 (k and v) = 32 GiB dense, as much again in pages: a point
whose `memory_plan` exceeds MEMORY_FRACTION of the GPU is skipped and says so in its JSON.

The decode goals of the project (`DECODE_GOALS`, B = 1, 16 heads): a step at least 15x faster than
the faster SDPA backend at 1M tokens with (4096, 12), and 8x at 128K with (512, 3); the kernel within
`FLOOR_GOAL` (2x) of its bytes floor wherever it is not launch-bound.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..decode import MobaKVCache, moba_decode
from ..routing import num_blocks
from .floors import ceilings, floor_ms
from .harness import GIB, GPU_HEAD_DIM, Suite, cuda_peak_bytes, do_bench_ms, point_name, register

SEQ_LENS = (32768, 131072, 524288, 1048576)
CONFIGS = ((512, 3), (128, 8), (4096, 12))          # (block_size, top_k)
SHAPES = ((1, 16, 16), (8, 32, 8))                 # (B, Hq, Hkv)
# (B, Hq, Hkv, S, block_size, top_k) -> the least speed-up over the faster SDPA backend the project aims for.
DECODE_GOALS = {(1, 16, 16, 1048576, 4096, 12): 15.0, (1, 16, 16, 131072, 512, 3): 8.0}
FLOOR_GOAL = 2.0          # decode time within 2x of its bytes floor, where not launch-bound
MEMORY_FRACTION = 0.9     # of the GPU's memory a point may plan to use
WORK_BYTES = 4 * GIB      # beside keys, values and pages: append's gathers and means, partials, do_bench's L2 flush
APPEND_CHUNK = 65536      # tokens per bulk append
DEVICE = "cuda"           # where points are measured (a test measures one on the CPU, under the interpreter)


def decode_bytes(S: int, Hkv: int, block_size: int, top_k: int, D: int = GPU_HEAD_DIM, itemsize: int = 2) -> dict:
    """Bytes one decoding step reads per sequence at a cache of S tokens: {"dense", "moba_means",
    "moba_pages", "moba"}. dense: all keys and values; moba: the float32 means of the S // block_size
    full blocks, then min(top_k, blocks) blocks of keys and values."""
    means = Hkv * (S // block_size) * D * 4
    pages = Hkv * min(top_k, num_blocks(S, block_size)) * block_size * 2 * D * itemsize
    return {"dense": Hkv * S * 2 * D * itemsize, "moba_means": means, "moba_pages": pages, "moba": means + pages}


def points() -> list[tuple[str, dict]]:
    """B = 1 first (the goals' shape), then B = 8; within each, by length (a run cut short keeps the short
    ones), then configuration: the points of one shape and length follow each other and share its keys
    and values."""
    return [(point_name(S=S, block_size=bs, top_k=k, heads=(Hq, Hkv), B=B),
             dict(B=B, Hq=Hq, Hkv=Hkv, S=S, block_size=bs, top_k=k))
            for B, Hq, Hkv in SHAPES for S in SEQ_LENS for bs, k in CONFIGS]


def memory_plan(B: int, Hkv: int, S: int, block_size: int, D: int = GPU_HEAD_DIM, itemsize: int = 2) -> dict:
    """Bytes a point holds at once: dense keys and values [B, Hkv, S, D] (SDPA's, and the source of the
    cache), the cache's pages and float32 means, and WORK_BYTES of working memory."""
    dense = 2 * B * Hkv * S * D * itemsize
    cache = dense + B * num_blocks(S, block_size) * Hkv * D * 4
    return {"dense_kv": dense, "cache": cache, "work": WORK_BYTES, "total": dense + cache + WORK_BYTES}


def dense_kv(B: int, Hkv: int, S: int, device, seed: int = 0, D: int = GPU_HEAD_DIM, dtype=torch.bfloat16):
    """Random keys and values [B, Hkv, S, D] (SDPA's layout), drawn in the dtype (no float32 copy)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(B, Hkv, S, D, device=device, dtype=dtype, generator=gen) for _ in range(2))


def build_cache(k: torch.Tensor, v: torch.Tensor, block_size: int, chunk: int = APPEND_CHUNK) -> MobaKVCache:
    """A full MobaKVCache (max_seqlen = S) holding k, v [B, Hkv, S, D], appended `chunk` tokens at a time."""
    B, Hkv, S, D = k.shape
    cache = MobaKVCache(B, Hkv, D, block_size=block_size, max_seqlen=S, dtype=k.dtype, device=k.device)
    for start in range(0, S, chunk):
        cache.append(k[:, :, start:start + chunk], v[:, :, start:start + chunk])
    return cache


def pages_read(routed: torch.Tensor, S: int, block_size: int, Hkv: int) -> int:
    """Distinct (sequence, key/value head, block) pages a step reads: each query's own block (the last,
    of a cache of S tokens) and its routed blocks. routed: int32 [B, 1, Hq, R] (-1: none), query head h
    reading key/value head h // (Hq // Hkv)."""
    B, _, Hq, R = routed.shape
    own = torch.full((B, Hq, 1), (S - 1) // block_size, dtype=torch.int64, device=routed.device)
    blocks = torch.cat([own, routed[:, 0].long()], dim=-1).reshape(B, Hkv, -1).sort(dim=-1).values
    new = torch.cat([blocks[..., :1] >= 0, (blocks[..., 1:] != blocks[..., :-1]) & (blocks[..., 1:] >= 0)], dim=-1)
    return int(new.sum())


def verdicts(record: dict) -> dict:
    """The goals of a measured point: its speed-up goal (None where the project sets none) and whether it
    is met, and whether the kernel is within FLOOR_GOAL of its floor (None where launch-bound)."""
    shape = record["shape"]
    goal = DECODE_GOALS.get((shape["B"], shape["Hq"], shape["Hkv"], shape["S"], record["block_size"], record["top_k"]))
    speedup = record.get("speedup_vs_sdpa")
    return {"goal_speedup_vs_sdpa": goal,
            "goal_met": None if goal is None or speedup is None else speedup >= goal,
            "floor_goal_met": None if record["launch_bound"] else record["over_floor"] <= FLOOR_GOAL}


# ---------------------------------------------------------------- measuring (GPU)

_shape: dict = {}   # the shape whose keys, values, query and SDPA times are held: {"key": (B, Hq, Hkv, S), ...}


def sdpa_ms(q, k, v, backend) -> dict:
    """One SDPA backend's decode: {"ms", "peak_bytes"}, or {"skipped": why} where it refuses the shape."""
    from torch.nn.attention import sdpa_kernel

    grouped = q.shape[1] != k.shape[1]
    call = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=grouped)  # noqa: E731
    with sdpa_kernel(backend), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call()
        except RuntimeError as error:
            reasons = [str(w.message).splitlines()[0] for w in caught] + [str(error).splitlines()[0]]
            return {"skipped": "; ".join(reasons)}
        return {"ms": do_bench_ms(call), "peak_bytes": cuda_peak_bytes(call)}


def shape_state(B: int, Hq: int, Hkv: int, S: int) -> dict:
    """Keys, values, the query and the SDPA times of a shape, made once (the previous shape's freed first)."""
    from torch.nn.attention import SDPBackend

    key = (B, Hq, Hkv, S)
    if _shape.get("key") != key:
        _shape.clear()
        torch.cuda.empty_cache()
        k, v = dense_kv(B, Hkv, S, DEVICE)
        q = torch.randn(B, Hq, 1, GPU_HEAD_DIM, device=DEVICE, dtype=torch.bfloat16,
                        generator=torch.Generator(device=DEVICE).manual_seed(1))
        sdpa = {name: sdpa_ms(q, k, v, backend)
                for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION))}
        _shape.update(key=key, k=k, v=v, q=q, sdpa=sdpa, overhead_ms=step_overhead_ms(B, Hq, Hkv))
    return _shape


def usable_bytes() -> int:
    """The memory a point may plan to use: MEMORY_FRACTION of the GPU's."""
    return int(torch.cuda.get_device_properties(0).total_memory * MEMORY_FRACTION)


def step_overhead_ms(B: int, Hq: int, Hkv: int) -> float:
    """The fixed cost of a decoding step of this shape: moba_decode on a cache of two blocks of 16 tokens
    (both read, top_k = 2): host work, launches, and almost no bytes."""
    k, v = dense_kv(B, Hkv, 32, DEVICE, seed=2)
    cache = build_cache(k, v, 16)
    q = torch.randn(B, Hq, 1, GPU_HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    return do_bench_ms(lambda: moba_decode(q, cache, top_k=2, impl="triton"))


def measure(params: dict, out_dir: Path) -> dict:
    """One point: the decode step's time, floor, pages read, peak memory, SDPA's times, speed-ups, goals."""
    from ..kernels.decode import route_pages

    B, Hq, Hkv, S, bs, top_k = (params[key] for key in ("B", "Hq", "Hkv", "S", "block_size", "top_k"))
    D = GPU_HEAD_DIM
    record = {"shape": dict(B=B, Hq=Hq, Hkv=Hkv, S=S, D=D), "dtype": "bfloat16", "block_size": bs, "top_k": top_k,
              "memory_plan": memory_plan(B, Hkv, S, bs),
              "usable_bytes": usable_bytes()}
    if record["memory_plan"]["total"] > record["usable_bytes"]:
        record["skipped"] = (f"needs {record['memory_plan']['total'] / GIB:.3g} GiB, more than the "
                             f"{record['usable_bytes'] / GIB:.3g} GiB usable on this GPU: not measured")
        print(f"  skipped: {record['skipped']}", flush=True)
        return record
    ceil = ceilings(out_dir)
    state = shape_state(B, Hq, Hkv, S)
    cache = build_cache(state["k"], state["v"], bs)
    q = state["q"]
    call = lambda: moba_decode(q, cache, top_k=top_k, impl="triton")  # noqa: E731
    start, lengths = cache.seqlens - 1, torch.ones(B, dtype=torch.int64)
    n_pages = pages_read(route_pages(q, cache, top_k, start, lengths), S, bs, Hkv)
    counted = {key: B * n for key, n in decode_bytes(S, Hkv, bs, top_k).items()}
    bytes_read = counted["moba_means"] + n_pages * bs * 2 * D * 2
    keys = Hq * B * min(S, top_k * bs)                   # attended (query head, key) pairs, for the FLOPs
    record.update(
        bytes=counted, pages_read=n_pages, bytes_read=bytes_read,
        copy_bytes_per_s=ceil["copy_bytes_per_s"],
        floor_ms=floor_ms(ceil, nbytes=bytes_read, flops=4 * D * keys, rate="bf16"),
        sdpa_floor_ms=floor_ms(ceil, nbytes=counted["dense"], flops=4 * D * Hq * B * S, rate="bf16"),
        moba_ms=do_bench_ms(call), moba_peak_bytes=cuda_peak_bytes(call),
        cache_bytes=sum(x.nbytes for x in (cache.k_pages, cache.v_pages, cache.means, cache.page_table)),
        step_overhead_ms=state["overhead_ms"], timing="do_bench median")
    del cache
    record["over_floor"] = record["moba_ms"] / record["floor_ms"]
    record["launch_bound"] = record["floor_ms"] < record["step_overhead_ms"]
    for name, result in state["sdpa"].items():
        record[f"{name}_ms"] = result.get("ms")
        record[f"{name}_peak_bytes"] = result.get("peak_bytes")
        if "skipped" in result:
            record[f"{name}_skipped"] = result["skipped"]
        else:
            record[f"speedup_vs_{name}"] = result["ms"] / record["moba_ms"]
    sdpa = [result["ms"] for result in state["sdpa"].values() if "ms" in result]
    if sdpa:
        record["sdpa_ms"] = min(sdpa)
        record["speedup_vs_sdpa"] = record["sdpa_ms"] / record["moba_ms"]
    record.update(verdicts(record))
    sdpa_us = record.get("sdpa_ms", float("nan")) * 1e3
    print(f"  moba {record['moba_ms'] * 1e3:.4g} us ({record['over_floor']:.3g}x its floor"
          f"{', launch-bound' if record['launch_bound'] else ''}), SDPA {sdpa_us:.4g} us: "
          f"{record.get('speedup_vs_sdpa', float('nan')):.3g}x", flush=True)
    return record


def plot(records: list[dict], out_dir: Path) -> list[Path]:
    """Per shape, step latency against cache length: MoBA per configuration with its bytes floor (dotted),
    SDPA's backends (grey), the goals (a star at the latency each needs: green met, red not met); and
    every point's time over its floor (open markers: launch-bound)."""
    import matplotlib.pyplot as plt

    from .plots import PLAIN, s_axes, save

    measured = [r for r in records if "skipped" not in r]
    fig, axes = plt.subplots(1, len(SHAPES) + 1, figsize=(17, 5))
    for ax, (B, Hq, Hkv) in zip(axes, SHAPES):
        mine = [r for r in measured if (r["shape"]["B"], r["shape"]["Hq"], r["shape"]["Hkv"]) == (B, Hq, Hkv)]
        for name, marker in (("cudnn", "s"), ("flash", "^")):
            by_s = {r["shape"]["S"]: r[f"{name}_ms"] for r in mine if r.get(f"{name}_ms") is not None}
            if by_s:
                ax.plot(sorted(by_s), [by_s[S] * 1e3 for S in sorted(by_s)], color="0.45", marker=marker, ls="--",
                        label=f"SDPA {'cuDNN' if name == 'cudnn' else 'FlashAttention'} (dense)")
        for i, (bs, k) in enumerate(CONFIGS):
            runs = sorted((r for r in mine if (r["block_size"], r["top_k"]) == (bs, k)), key=lambda r: r["shape"]["S"])
            S = [r["shape"]["S"] for r in runs]
            ax.plot(S, [r["moba_ms"] * 1e3 for r in runs], color=f"C{i}", marker="o", label=f"MoBA ({bs}, {k})")
            ax.plot(S, [r["floor_ms"] * 1e3 for r in runs], color=f"C{i}", ls=":", lw=1,
                    label="dotted: bytes floors" if i == 0 else None)
            for r in runs:
                if r.get("goal_speedup_vs_sdpa") is not None and r.get("sdpa_ms") is not None:
                    met, goal = r["goal_met"], r["goal_speedup_vs_sdpa"]
                    need = r["sdpa_ms"] / goal * 1e3
                    ax.plot([r["shape"]["S"]], [need], marker="*", ms=14, ls="none", color="g" if met else "r")
                    ax.annotate(f"goal >= {goal:g}x SDPA ({bs}, {k}):\n{'met' if met else 'not met'}, "
                                f"{r['speedup_vs_sdpa']:.3g}x", (r["shape"]["S"], need), textcoords="offset points",
                                xytext=(-8, -22), ha="right", fontsize=7, color="g" if met else "r")
        ax.set(yscale="log", ylabel="one decoding step (us)", title=f"B = {B}, {Hq} query / {Hkv} key-value heads")
        ax.yaxis.set_major_formatter(PLAIN)
    ax_floor = axes[-1]
    for i, (bs, k) in enumerate(CONFIGS):
        for (B, Hq, Hkv), ls in zip(SHAPES, ("-", "--")):
            runs = sorted((r for r in measured if (r["block_size"], r["top_k"], r["shape"]["B"]) == (bs, k, B)),
                          key=lambda r: r["shape"]["S"])
            ax_floor.plot([r["shape"]["S"] for r in runs], [r["over_floor"] for r in runs], color=f"C{i}", ls=ls,
                          label=f"({bs}, {k}), B = {B}")
            for r in runs:
                ax_floor.plot([r["shape"]["S"]], [r["over_floor"]], marker="o", color=f"C{i}",
                              mfc="none" if r["launch_bound"] else f"C{i}")
    ax_floor.axhline(FLOOR_GOAL, color="k", ls="--", lw=1, label=f"goal: {FLOOR_GOAL:g}x the floor (not launch-bound)")
    ax_floor.set(yscale="log", ylabel="MoBA time / its bytes floor (x)",
                 title="how far from reading its bytes at copy speed\n"
                       "(open markers: launch-bound, goal does not apply)")
    ax_floor.yaxis.set_major_formatter(PLAIN)
    s_axes(*axes)
    for ax in axes:
        ax.set_xlabel("cached tokens per sequence")
    machine = records[0]["machine"]
    skipped = sorted({r["point"] for r in records if "skipped" in r})
    fig.suptitle(f"MoBA decode (Triton) vs SDPA decode on {machine.get('gpu', '?')}: one token, bf16, head dim "
                 f"{GPU_HEAD_DIM}; torch {machine['torch']}, triton {machine['triton']}"
                 + (f"; skipped for memory: {', '.join(skipped)}" if skipped else ""), fontsize=10)
    fig.text(0.5, 0.012, "bytes floor: the float32 means of the full blocks plus the distinct pages the step's routing "
             "chose, read at the copy bandwidth measured on this GPU; launch-bound: the floor is below the time of "
             "the same call on a 32-token cache", fontsize=8, ha="center")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return save(fig, out_dir / "h200_decode.png")


DECODE = register(Suite("decode", "gpu", points, measure, plot))
