"""What MoBA saves: attended (query, key) pairs and FLOPs of MoBA against dense causal attention.

Query t attends its own block causally (t mod block_size + 1 keys) plus min(top_k - 1, t // block_size)
whole earlier blocks, whatever the gates say, so the cost depends on S, block_size and top_k only.
Dense causal attention attends t + 1 keys. Per attended pair, attention costs 4·D FLOPs (2·D for
q·k and 2·D for p·v). The router adds the block means (S·D additions) and one 2·D dot product per
query and eligible block: quadratic in S too, but D·S²/block_size instead of D·S².

All counts are per head and sequence.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from ..checks.grading import exercise
from ..routing import own_block


@exercise("nb00.check_causal_fraction", "nb04.check_attended_pairs")
def attended_pairs(seq_len: int, block_size: int, top_k: int) -> int:
    """(query, key) pairs MoBA attends; equals the True count of the token mask for any routing."""
    t = torch.arange(seq_len)
    own = own_block(seq_len, block_size)
    keys = t - own * block_size + 1 + block_size * own.clamp(max=top_k - 1)
    return int(keys.sum())


def dense_pairs(seq_len: int) -> int:
    """(query, key) pairs of dense causal attention: S (S + 1) / 2."""
    return seq_len * (seq_len + 1) // 2


def density(seq_len: int, block_size: int, top_k: int) -> float:
    """Fraction of the causal pairs MoBA attends (1 = dense)."""
    return attended_pairs(seq_len, block_size, top_k) / dense_pairs(seq_len)


def flops(seq_len: int, block_size: int, top_k: int, head_dim: int) -> dict[str, int]:
    """FLOPs of one head: {"dense", "moba_attention", "moba_router", "moba"}."""
    eligible_blocks = int(own_block(seq_len, block_size).sum())  # query t may route to blocks 0 .. own - 1
    router = seq_len * head_dim + 2 * head_dim * eligible_blocks
    attention = 4 * head_dim * attended_pairs(seq_len, block_size, top_k)
    return {"dense": 4 * head_dim * dense_pairs(seq_len), "moba_attention": attention,
            "moba_router": router, "moba": attention + router}


def plot_cost(block_size: int = 512, top_k: int = 3, head_dim: int = 128, seq_lens=None, *, fig=None):
    """Density (left) and FLOPs (right) of MoBA vs dense as S grows, log scales. Returns the Figure."""
    seq_lens = seq_lens or [2 ** p for p in range(10, 21)]
    fig = fig or plt.figure(figsize=(10, 3.8))
    left, right = fig.subplots(1, 2)
    left.plot(seq_lens, [density(s, block_size, top_k) for s in seq_lens], marker="o", label="MoBA")
    left.axhline(1, color="k", ls="--", lw=1.5, label="dense causal")
    left.set(xscale="log", yscale="log", xlabel="sequence length S (tokens)",
             ylabel="attended pairs / dense causal pairs", title="density")
    counts = [flops(s, block_size, top_k, head_dim) for s in seq_lens]
    lines = (("dense", "dense causal", "--", "k"), ("moba", "MoBA (attention + router)", "-", "C0"),
             ("moba_router", "MoBA router only", ":", "C1"))
    for key, label, style, color in lines:
        right.plot(seq_lens, [c[key] for c in counts], ls=style, color=color, marker="o", ms=3, label=label)
    right.set(xscale="log", yscale="log", xlabel="sequence length S (tokens)", ylabel="FLOPs per head",
              title="FLOPs")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"cost of MoBA vs dense causal attention (block_size={block_size}, top_k={top_k}, "
                 f"head_dim={head_dim})")
    fig.tight_layout()
    return fig
