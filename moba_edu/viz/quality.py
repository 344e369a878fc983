"""Figures of router quality: attention mass kept by the router vs the oracle (the numbers come from
`moba_edu.quality`, which has no matplotlib and is re-exported here).

Shapes: mass [..., S, N].
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from ..quality import (RecallCurve, attention_probs, block_mass, oracle_mass, oracle_order,  # noqa: F401
                       recall_curve, routed_mass)
from ..routing import Routing
from .maps import STATE_COLORS, block_axis, block_states, state_legend


def plot_recall(curves: dict[str, RecallCurve], *, top_k: int | None = None, ax=None):
    """Mass kept vs top_k: router (solid) and oracle (dashed), one colour per curve name. Returns the Axes."""
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    for (name, curve), color in zip(curves.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        ax.plot(curve.top_k, curve.router, color=color, marker="o", ms=4, label=f"{name}: router")
        ax.plot(curve.top_k, curve.oracle, color=color, ls="--", lw=1, label=f"{name}: oracle")
    if top_k is not None:
        ax.axvline(top_k, color="0.5", lw=1, ls=":", gid="top_k")
    block_axis(ax.xaxis)
    ax.set(xlabel="top_k (blocks per query, own block included)", ylabel="attention mass kept",
           ylim=(0, 1.02), title="attention mass kept (mean over queries)")
    ax.legend(fontsize=7, loc="lower right")
    return ax


def plot_query_mass(routing: Routing, mass: torch.Tensor, block_size: int, head: int, query: int,
                    top_k: int, *, ax=None, legend: bool = True):
    """One query's true attention mass per key block (mass [1, Hq, S, N]), bars coloured by what the
    router did, stars on the oracle's choice of the same number of blocks. Returns the Axes."""
    ax = ax or plt.subplots(figsize=(5, 3))[1]
    row = mass[0, head, query]
    states = block_states(routing, block_size, head)[query]
    ax.bar(range(len(row)), row.numpy(), color=[STATE_COLORS[s] for s in states], edgecolor="0.3", linewidth=0.6)
    best = oracle_order(mass[0, head], block_size, top_k)[query]
    best = best[best >= 0]
    star = ax.plot(best, row[best] + 0.04, "k*", ms=8, label="oracle's choice")
    kept = routed_mass(row, routing.mask[0, head, query])
    ax.set(xlabel="key block j", ylabel="attention mass of block j", ylim=(0, 1.1),
           title=f"query t={query}: router keeps {kept:.2f}, oracle {row[best].sum():.2f}")
    block_axis(ax.xaxis)
    if legend:
        state_legend(ax, extra=star, loc="best", fontsize=8, framealpha=0.9)
    return ax
