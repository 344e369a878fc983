"""Every committed routing figure, written by `save_all` (`make figures` calls it via moba_edu.figures).

The figures use the presets of `presets.py` at the dashboard's default sizes (S = 256, block_size 32,
top_k 3, 4 heads of dim 16), so the README, notebook 03 and the dashboard tell the same story. The
cost figure uses block_size 512 and top_k 3 (81.25% sparsity at 8K tokens), a setting of the MoBA
paper's scaling experiments.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from ..routing import route
from .cost import plot_cost
from .explore import Explorer
from .heads import plot_block_frequency, plot_heads
from .maps import plot_block_map, plot_token_mask
from .presets import make_sample
from .quality import plot_recall, recall_curve
from .scores import plot_query_scores, plot_scores

SEQ_LEN, BLOCK_SIZE, TOP_K = 256, 32, 3


def _routed(preset: str):
    sample = make_sample(preset, seq_len=SEQ_LEN)
    return sample, route(sample.q, sample.k, block_size=BLOCK_SIZE, top_k=TOP_K)


def routing_map():
    """Token mask and block routing map of the needle preset, the needle query marked."""
    sample, routing = _routed("needle")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.6), width_ratios=(1.3, 1))
    plot_token_mask(routing, BLOCK_SIZE, query=sample.needle_query, ax=left)
    plot_block_map(routing, BLOCK_SIZE, query=sample.needle_query, ax=right, legend=False)
    fig.suptitle(f"MoBA routing, needle data: S={SEQ_LEN}, block_size={BLOCK_SIZE}, top_k={TOP_K} "
                 f"(dashed: the needle query; its needle key sits at s={sample.needle_key})")
    return fig


def gates():
    """Scores of every query, and the needle query's scores as bars (saved as gates.png)."""
    sample, routing = _routed("needle")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), width_ratios=(1.2, 1))
    plot_scores(routing, BLOCK_SIZE, ax=left)
    plot_query_scores(routing, BLOCK_SIZE, 0, sample.needle_query, ax=right)
    fig.suptitle(f"scores q·mean(k), needle data (block_size={BLOCK_SIZE}, top_k={TOP_K})")
    fig.tight_layout()
    return fig


def heads():
    """Per-head routing maps of the periodic preset, and how often each block is chosen."""
    _, routing = _routed("periodic")
    fig = plt.figure(figsize=(13, 4.2))
    maps, freq = fig.subfigures(1, 2, width_ratios=(2.4, 1))
    plot_heads(routing, BLOCK_SIZE, fig=maps)
    plot_block_frequency(routing, BLOCK_SIZE, ax=freq.subplots())
    return fig


def recall():
    """Mass kept vs top_k, router against oracle: random and periodic data, and the needle query."""
    curves = {}
    for preset in ("random", "periodic"):
        sample = make_sample(preset, seq_len=SEQ_LEN)
        curves[f"{preset} (all queries)"] = recall_curve(sample.q, sample.k, BLOCK_SIZE)
    needle = make_sample("needle", seq_len=SEQ_LEN)
    curves["needle query only"] = recall_curve(needle.q, needle.k, BLOCK_SIZE, queries=[needle.needle_query])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    plot_recall(curves, ax=ax)
    ax.set_title(f"attention mass kept by the router vs the oracle (S={SEQ_LEN}, block_size={BLOCK_SIZE})")
    fig.tight_layout()
    return fig


def cost():
    return plot_cost(block_size=512, top_k=3, head_dim=128)


def explorer():
    """A still of the dashboard `explore()` at its defaults."""
    return Explorer().figure


FIGURES = {"routing_map": routing_map, "gates": gates, "heads": heads, "recall": recall, "cost": cost,
           "explorer": explorer}


def save_all(out_dir: Path) -> list[Path]:
    """Write every figure of FIGURES as out_dir/<name>.png; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in FIGURES.items():
        fig = make()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
