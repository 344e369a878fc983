"""Data presets for the routing views: queries and keys whose routing tells a story.

- "random":   i.i.d. Gaussian queries (std 2) and keys (std 1): each query's attention has a few
              favourite keys scattered at random, which block means hardly reveal, so the router often
              misses them: the baseline.
- "needle":   one key (the needle) sits in an early block and one late query (the needle query)
              points straight at it; every other key is noise that is nearly orthogonal to the needle.
              The needle lifts its block's mean key, so the router should pick that block.
- "periodic": the sequence is cut into segments of `segment` tokens, each about one of a few topics,
              and the topics repeat in turn; a token's query and key both point at its topic. Queries
              should route to earlier blocks of their own topic, which draws stripes in the routing
              map; head h cycles through h + 2 topics, so heads differ.

Shapes: q [1, H, S, D], k [1, H, S, D] float32 (one sequence, Hq = Hkv = H).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PRESETS = ("random", "needle", "periodic")


@dataclass
class Sample:
    """Queries and keys of one preset.

    q, k: float32 [1, H, S, D]. For "needle": `needle_key` is the position of the needle key and
    `needle_query` that of the query that looks for it (the same in every head); None otherwise.
    """

    preset: str
    q: torch.Tensor
    k: torch.Tensor
    needle_key: int | None = None
    needle_query: int | None = None


def make_sample(preset: str = "needle", *, seq_len: int = 256, heads: int = 4, head_dim: int = 16,
                seed: int = 0, segment: int = 32) -> Sample:
    """Build the queries and keys of `preset` (one of PRESETS); deterministic given `seed`."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, heads, seq_len, head_dim)
    if preset == "random":
        # std 2 makes the scaled scores q.k / sqrt(D) of std 2: attention with favourites, as trained heads have
        return Sample(preset, 2 * torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
    if preset == "needle":
        return _needle(shape, gen)
    if preset == "periodic":
        return _periodic(shape, gen, segment)
    raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")


def needle_positions(seq_len: int) -> tuple[int, int]:
    """(needle key, needle query): the key a fifth of the way in, the query a sixteenth before the end."""
    return seq_len // 5, seq_len - seq_len // 16 - 1


def _needle(shape, gen) -> Sample:
    _, H, S, D = shape
    q = torch.randn(shape, generator=gen)
    k = torch.randn(shape, generator=gen)
    u = torch.nn.functional.normalize(torch.randn(1, H, 1, D, generator=gen), dim=-1)  # needle direction
    # Shrink every key's component along u to a little noise, so no other block looks like the needle.
    along_u = (k * u).sum(-1, keepdim=True)
    k = k - along_u * u + 0.1 * torch.randn(1, H, S, 1, generator=gen) * u
    key, query = needle_positions(S)
    # Needle key and query both along u: their scaled score, 2 * 2.5 * D / sqrt(D) = 5 sqrt(D), dwarfs
    # the noise, so the needle also holds nearly all of the needle query's true attention.
    k[:, :, key] = 2 * math.sqrt(D) * u[:, :, 0]
    q[:, :, query] = 2.5 * math.sqrt(D) * u[:, :, 0]
    return Sample("needle", q, k, needle_key=key, needle_query=query)


def _periodic(shape, gen, segment: int) -> Sample:
    _, H, S, D = shape
    topics = torch.nn.functional.normalize(torch.randn(H, H + 1, D, generator=gen), dim=-1) * math.sqrt(D)
    n_topics = torch.arange(2, H + 2)  # head h cycles through h + 2 topics
    topic = (torch.arange(S)[None, :] // segment) % n_topics[:, None]  # [H, S]
    base = torch.stack([topics[h, topic[h]] for h in range(H)])[None]  # [1, H, S, D]
    q = base + 0.5 * torch.randn(shape, generator=gen)
    k = base + 0.5 * torch.randn(shape, generator=gen)
    return Sample("periodic", q, k)
