"""Heads route independently: their routing maps side by side, and how often each block is chosen.

Shapes: a `Routing` of q [1, Hq, S, D]; block maps [S, N] per head.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..routing import Routing, eligible
from .maps import ROUTED, block_axis, block_states, plot_block_map, state_legend


def plot_heads(routing: Routing, block_size: int, *, fig=None):
    """One block routing map per head, side by side. Returns the Figure."""
    heads = routing.mask.shape[1]
    fig = fig or plt.figure(figsize=(2.6 * heads, 3.6))
    axes = fig.subplots(1, heads, sharey=True, squeeze=False)[0]
    for head, ax in enumerate(axes):
        plot_block_map(routing, block_size, head, ax=ax, legend=False)
        ax.set_title(f"head {head}")
    state_legend(axes[-1], loc="upper right", fontsize=7, framealpha=0.9)
    fig.suptitle("block routing map of each head (rows: queries, columns: key blocks)")
    return fig


def block_frequency(routing: Routing, block_size: int) -> np.ndarray:
    """float [Hq, N - 1]: of the queries that may route to block j (j eligible), the share that do.

    Dividing by the eligible queries removes the plain effect of position (block 0 is eligible for
    almost every query, block N - 2 for one block of queries); the last block is never eligible.
    """
    S, N = routing.mask.shape[-2:]
    n_eligible = eligible(S, block_size).sum(0)[: N - 1]
    routed = [(block_states(routing, block_size, h) == ROUTED).sum(0)[: N - 1] / n_eligible
              for h in range(routing.mask.shape[1])]
    return np.stack([r.numpy() for r in routed])


def plot_block_frequency(routing: Routing, block_size: int, *, ax=None):
    """How often each key block is routed to, one line per head. Returns the Axes."""
    ax = ax or plt.subplots(figsize=(5, 3))[1]
    freq = block_frequency(routing, block_size)
    for head, row in enumerate(freq):
        ax.plot(np.arange(len(row)), row, marker="o", ms=4, label=f"head {head}")
    ax.set(xlabel="key block j", ylabel="share of eligible queries routed to j", ylim=(0, 1.02),
           title="how often each block is chosen")
    block_axis(ax.xaxis)
    ax.legend(fontsize=8)
    return ax
