"""Why the router chose what it chose: the scores q_t . mean_k(j) (`Routing.scores`).

`plot_scores` shows every query's scores as a heat map with the ineligible region (the own block and
everything after it, where the gates are -inf) shaded and the routed blocks dotted; `plot_query_scores`
shows one query's scores as bars, coloured by what happened to each block (the colours of `maps`).

Shapes: a `Routing` of q [B, Hq, S, D]; scores [S, N] per head.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..routing import Routing, eligible
from .maps import FUTURE, ROUTED, STATE_COLORS, block_axis, block_states, state_legend


def plot_scores(routing: Routing, block_size: int, head: int = 0, *, ax=None):
    """Heat map of the scores [S, N] of one head; shaded = ineligible, dots = routed. Returns the Axes."""
    ax = ax or plt.subplots(figsize=(5, 4.5))[1]
    scores = routing.scores[0, head].numpy()
    S, N = scores.shape
    extent = (-0.5, N - 0.5, S - 0.5, -0.5)
    limit = float(np.abs(scores).max()) or 1.0
    image = ax.imshow(scores, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest",
                      extent=extent)
    ineligible = ~eligible(S, block_size).numpy()
    ax.imshow(np.where(ineligible, 1.0, np.nan), cmap="Greys", vmin=0, vmax=1.6, alpha=0.75, aspect="auto",
              interpolation="nearest", extent=extent)  # NaN cells stay transparent
    t, j = np.nonzero(block_states(routing, block_size, head).numpy() == ROUTED)
    ax.scatter(j, t, s=3, c="k", marker="s", linewidths=0, label="routed")
    ax.figure.colorbar(image, ax=ax, label="score q·mean(k)")
    ax.set(xlabel="key block j", ylabel="query position t", title=f"scores, head {head} (grey: ineligible)")
    block_axis(ax.xaxis)
    ax.legend(loc="lower left", fontsize=8, markerscale=3, framealpha=0.9)
    return ax


def plot_query_scores(routing: Routing, block_size: int, head: int, query: int, *, ax=None, legend: bool = True):
    """Bars of one query's score per key block, coloured by state; future blocks hatched. Returns the Axes."""
    ax = ax or plt.subplots(figsize=(5, 3))[1]
    scores = routing.scores[0, head, query].numpy()
    states = block_states(routing, block_size, head)[query].numpy()
    colors = [STATE_COLORS[s] for s in states]
    bars = ax.bar(np.arange(len(scores)), scores, color=colors, edgecolor="0.3", linewidth=0.6)
    for bar, state in zip(bars, states):
        if state == FUTURE:  # the router never looks there
            bar.set_hatch("///")
    ax.axhline(0, color="0.3", lw=0.6)
    ax.set(xlabel="key block j", ylabel="score q_t·mean(k_j)",
           title=f"scores of query t={query} (own block {query // block_size})")
    block_axis(ax.xaxis)
    if legend:
        state_legend(ax, loc="best", fontsize=8, framealpha=0.9)
    return ax
