"""Where each query looks: the token-level attention mask and the block-level routing map of one head.

Every cell gets one of four states, drawn in the same colours in every view:
FUTURE (after the query: causal attention never looks there), SKIPPED (in the past but not chosen),
ROUTED (chosen by the router's gates) and OWN (the query's own block, always attended, causally).
`text_block_map` prints the block map with ██ (attended) and ░░ (skipped), so notebooks can show and
compare it as plain text.

Shapes: a `Routing` of q [B, Hq, S, D]; `block_states` -> int [S, N], `token_states` -> int [S, S].
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from ..routing import Routing, eligible, own_block

FUTURE, SKIPPED, ROUTED, OWN = range(4)
STATE_NAMES = ("future", "skipped", "routed", "own block")
STATE_COLORS = ("#ffffff", "#d9d9d9", "#1f77b4", "#ff7f0e")
STATE_CMAP = ListedColormap(STATE_COLORS)


def block_states(routing: Routing, block_size: int, head: int = 0, batch: int = 0) -> torch.Tensor:
    """int64 [S, N]: the state of block j for query t (FUTURE, SKIPPED, ROUTED or OWN)."""
    mask = routing.mask[batch, head]
    S, N = mask.shape
    states = torch.full((S, N), FUTURE, dtype=torch.int64)
    states[eligible(S, block_size)] = SKIPPED
    states[mask] = ROUTED
    states[torch.arange(S), own_block(S, block_size)] = OWN
    return states


def token_states(routing: Routing, block_size: int, head: int = 0, batch: int = 0) -> torch.Tensor:
    """int64 [S, S]: the state of key s for query t; keys after the query are FUTURE."""
    states = block_states(routing, block_size, head, batch)
    S = states.shape[0]
    per_key = states[:, own_block(S, block_size)]  # key s inherits the state of its block s // block_size
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    return per_key.masked_fill(~causal, FUTURE)


def state_handles(states=(OWN, ROUTED, SKIPPED)) -> list[Patch]:
    """Legend entries naming the state colours (by default not FUTURE: those cells are blank)."""
    return [Patch(facecolor=STATE_COLORS[s], edgecolor="0.4", label=STATE_NAMES[s]) for s in states]


def state_legend(ax, extra=(), **kwargs) -> None:
    """A legend of the state colours, then the `extra` artists."""
    ax.legend(handles=state_handles() + list(extra), **kwargs)


def block_axis(axis) -> None:
    """Integer ticks on an axis that counts key blocks: every block up to 16 blocks, then fewer."""
    axis.set_major_locator(MaxNLocator(nbins=16, integer=True, steps=[1, 2, 5, 10], min_n_ticks=1))


def marker(ax, gid: str):
    """The line of `ax` tagged `gid` ("query" or "top_k"), so a dashboard can move it."""
    return next(line for line in ax.lines if line.get_gid() == gid)


def _draw_states(ax, states: torch.Tensor, extent) -> None:
    ax.imshow(states.numpy(), cmap=STATE_CMAP, vmin=0, vmax=len(STATE_COLORS) - 1, interpolation="nearest",
              aspect="auto", extent=extent)


def plot_token_mask(routing: Routing, block_size: int, head: int = 0, *, query: int | None = None,
                    ax=None, legend: bool = True):
    """The [S, S] attention mask of one head: which keys (x) each query (y) attends, and why.

    A dashed line marks `query`, if given. Returns the Axes.
    """
    ax = ax or plt.subplots(figsize=(5, 4.5))[1]
    states = token_states(routing, block_size, head)
    S = states.shape[0]
    _draw_states(ax, states, extent=(-0.5, S - 0.5, S - 0.5, -0.5))
    edges = [edge - 0.5 for edge in range(block_size, S, block_size)]
    if len(edges) < 16:  # block boundaries along the keys, while they stay apart
        ax.vlines(edges, -0.5, S - 0.5, color="0.6", lw=0.5)
    if query is not None:
        ax.axhline(query, color="k", lw=1, ls="--", gid="query")
    ax.set(xlabel="key position s", ylabel="query position t", title=f"token mask, head {head}")
    if legend:
        state_legend(ax, loc="upper right", fontsize=8, framealpha=0.9)
    return ax


def plot_block_map(routing: Routing, block_size: int, head: int = 0, *, query: int | None = None,
                   ax=None, legend: bool = True):
    """The [S, N] routing map of one head: which key blocks (x) each query (y) attends. Returns the Axes."""
    ax = ax or plt.subplots(figsize=(4, 4.5))[1]
    states = block_states(routing, block_size, head)
    S, N = states.shape
    _draw_states(ax, states, extent=(-0.5, N - 0.5, S - 0.5, -0.5))
    if query is not None:
        ax.axhline(query, color="k", lw=1, ls="--", gid="query")
    ax.set(xlabel="key block j", ylabel="query position t", title=f"block routing map, head {head}")
    block_axis(ax.xaxis)
    if legend:
        state_legend(ax, loc="upper right", fontsize=8, framealpha=0.9)
    return ax


def block_row(states: torch.Tensor) -> str:
    """One query's row of block states int [N] as text: ██ attended, ░░ skipped, ·· future."""
    glyph = {FUTURE: "··", SKIPPED: "░░", ROUTED: "██", OWN: "██"}
    return "".join(glyph[int(s)] for s in states)


def text_block_map(routing: Routing, block_size: int, head: int = 0, queries=None) -> str:
    """The block routing map as text, one line per query (default: the last query of every block).

    ██ = attended (own block or routed), ░░ = in the past but skipped, ·· = future block.
    """
    states = block_states(routing, block_size, head)
    S = states.shape[0]
    if queries is None:
        queries = [min(end, S) - 1 for end in range(block_size, S + block_size, block_size)]
    width = len(str(S - 1))
    return "\n".join(f"t={t:>{width}} {block_row(states[t])}" for t in queries)
