"""What MoBA saves, drawn: density and FLOPs of MoBA against dense causal attention as S grows.

The numbers come from the cost model, `moba_edu.cost` (which says how they are counted); this module
only plots them.
"""

from __future__ import annotations

import matplotlib.pyplot as plt

from ..cost import density, flops


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
