"""Timing one decoding step: the Triton MoBA decode against SDPA's dense decode (docs/design.md §2a, §6).

Not a registered suite yet (suites.py does not import this module): `time_decode` measures one point
and `decode_bytes` counts what a step must read, for the decode suite to build on.

A decoding step is bound by memory, not arithmetic (notebook 09): dense attention reads every cached
key and value once, MoBA reads one float32 mean per full block (to route) and then top_k blocks of
keys and values. Its floor is those bytes over the copy bandwidth (floors.py).
"""

from __future__ import annotations

import torch

from ..decode import MobaKVCache, moba_decode
from ..routing import num_blocks
from .harness import GPU_HEAD_DIM, do_bench_ms


def decode_bytes(S: int, Hkv: int, block_size: int, top_k: int, D: int = GPU_HEAD_DIM, itemsize: int = 2) -> dict:
    """Bytes one decoding step reads per sequence at a cache of S tokens: {"dense", "moba_means",
    "moba_pages", "moba"}. dense: all keys and values; moba: the float32 means of the S // block_size
    full blocks, then min(top_k, blocks) blocks of keys and values."""
    means = Hkv * (S // block_size) * D * 4
    pages = Hkv * min(top_k, num_blocks(S, block_size)) * block_size * 2 * D * itemsize
    return {"dense": Hkv * S * 2 * D * itemsize, "moba_means": means, "moba_pages": pages, "moba": means + pages}


def filled_cache(S: int, Hkv: int, block_size: int, seed: int = 0, chunk: int = 65536) -> MobaKVCache:
    """A bf16 GPU cache of one sequence holding S random tokens (appended a chunk at a time), room for one more."""
    cache = MobaKVCache(1, Hkv, GPU_HEAD_DIM, block_size=block_size, max_seqlen=S + 1, dtype=torch.bfloat16,
                        device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for start in range(0, S, chunk):
        n = min(chunk, S - start)
        k, v = (torch.randn(1, Hkv, n, GPU_HEAD_DIM, device="cuda", generator=gen).bfloat16() for _ in range(2))
        cache.append(k, v)
    return cache


def time_decode(S: int, Hq: int, Hkv: int, block_size: int, top_k: int) -> dict:
    """One query token per head over a cache of S tokens (B = 1, head dim 128, bf16): do_bench medians in ms
    of moba_decode(impl="triton") (host work included: it is part of every step) and of dense SDPA over
    the same keys (cuDNN and FlashAttention-2 backends; grouped heads on repeated k, v), with the bytes
    of `decode_bytes` and the speed-ups."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cache = filled_cache(S, Hkv, block_size)
    q = torch.randn(1, Hq, 1, GPU_HEAD_DIM, device="cuda").bfloat16()
    record = {"shape": dict(B=1, Hq=Hq, Hkv=Hkv, S=S, D=GPU_HEAD_DIM, block_size=block_size, top_k=top_k),
              "bytes": decode_bytes(S, Hkv, block_size, top_k),
              "moba_ms": do_bench_ms(lambda: moba_decode(q, cache, top_k=top_k, impl="triton"))}
    k, v = (x[None].repeat_interleave(Hq // Hkv, 1) for x in cache.sequence(0))   # [1, Hq, S, D]
    del cache
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel(backend):
            record[f"{name}_ms"] = do_bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        record[f"speedup_vs_{name}"] = record[f"{name}_ms"] / record["moba_ms"]
    return record
