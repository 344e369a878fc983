"""`explore()`: a live dashboard of the router, built from standard ipywidgets only.

Sliders and pickers choose the data preset, sequence length, block size, top_k, head and query; one
handler recomputes the routing (`moba_edu.route`) and redraws every view together. The views are
one matplotlib figure rendered to PNG into an `ipywidgets.Image` (plus an HTML summary line), which
renders the same in JupyterLab, classic Jupyter and VS Code without any extra front-end extension
and without an interactive matplotlib backend.

Responsiveness: the goal is an update well under a second at the default sizes (S = 256, 4 heads,
head_dim 16) on a 2-core CPU; the benchmark suite `explorer` measures it (`python -m moba_edu.bench
--cpu --only explorer`, figures/bench/cpu_explorer.png). Data and the true attention are cached
per preset and size, so moving top_k, head or query only re-routes and redraws; top_k and query even
keep the axes and only update what they change.
"""

from __future__ import annotations

import io
from functools import lru_cache

import ipywidgets as widgets
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..routing import route
from .maps import (FUTURE, OWN, ROUTED, SKIPPED, block_row, block_states, marker, plot_block_map, plot_token_mask,
                   state_handles, token_states)
from .presets import PRESETS, make_sample, needle_positions
from .quality import attention_probs, block_mass, oracle_mass, plot_query_mass, plot_recall, recall_curve
from .scores import plot_query_scores

SEQ_LENS = (64, 128, 256, 512)
BLOCK_SIZES = (8, 16, 32, 64)
MAX_TOP_K = 8
LEGEND = state_handles((OWN, ROUTED, SKIPPED, FUTURE)) + [
    Line2D([], [], color="k", marker="*", ls="", label="oracle's choice"),
    Line2D([], [], color="k", ls="--", label="query t")]


@lru_cache(maxsize=8)
def _sample(preset: str, seq_len: int, heads: int, head_dim: int, seed: int):
    return make_sample(preset, seq_len=seq_len, heads=heads, head_dim=head_dim, seed=seed)


@lru_cache(maxsize=8)
def _truth(preset: str, seq_len: int, heads: int, head_dim: int, seed: int, block_size: int):
    """(block mass [1, H, S, N], one RecallCurve per head) of a sample: what top_k, head and query do not change."""
    sample = _sample(preset, seq_len, heads, head_dim, seed)
    mass = block_mass(attention_probs(sample.q, sample.k), block_size)
    curves = [recall_curve(sample.q[:, h:h + 1], sample.k[:, h:h + 1], block_size) for h in range(heads)]
    return mass, curves


class Explorer(widgets.VBox):
    """The dashboard widget. `controls` maps a name to its widget ("preset", "seq_len", "block_size",
    "top_k", "head", "query"); setting a control's value (by hand or in code) redraws `image` and
    `summary`."""

    def __init__(self, preset: str = "needle", *, seq_len: int = 256, block_size: int = 32, top_k: int = 3,
                 head: int = 0, query: int | None = None, heads: int = 4, head_dim: int = 16, seed: int = 0):
        self.heads, self.head_dim, self.seed = heads, head_dim, seed
        wide = {"description_width": "80px"}
        slider = dict(style=wide, continuous_update=False, layout=widgets.Layout(width="380px"))
        self.controls = {
            "preset": widgets.ToggleButtons(options=PRESETS, value=preset, description="data", style=wide),
            "seq_len": widgets.SelectionSlider(options=SEQ_LENS, value=seq_len, description="seq_len S", **slider),
            "block_size": widgets.SelectionSlider(options=BLOCK_SIZES, value=block_size, description="block_size",
                                                  **slider),
            "top_k": widgets.IntSlider(value=top_k, min=1, max=MAX_TOP_K, description="top_k", **slider),
            "head": widgets.IntSlider(value=head, min=0, max=heads - 1, description="head", **slider),
            "query": widgets.IntSlider(value=needle_positions(seq_len)[1] if query is None else query, min=0,
                                       max=seq_len - 1, description="query t", **slider),
        }
        self.summary = widgets.HTML()
        self.image = widgets.Image(format="png", layout=widgets.Layout(width="100%", max_width="1000px"))
        self.figure = Figure(figsize=(12.5, 7), dpi=80)
        FigureCanvasAgg(self.figure)
        self._busy = False
        self._layout = None  # what the panels were built for: (data key, block_size, head)
        c = self.controls
        columns = widgets.HBox([widgets.VBox([c["seq_len"], c["block_size"], c["top_k"]]),
                                widgets.VBox([c["head"], c["query"]])])
        super().__init__([c["preset"], columns, self.summary, self.image])
        for control in self.controls.values():
            control.observe(self._on_change, names="value")
        self.update()

    def values(self) -> dict:
        """The current control values, by control name."""
        return {name: control.value for name, control in self.controls.items()}

    def _on_change(self, change) -> None:
        if not self._busy:  # changes made by update() itself (the query range) do not redraw twice
            self.update(change)

    def update(self, change=None) -> None:
        """Re-route and redraw every view from the current control values."""
        self._busy = True
        try:
            self._fit_query_range(change)
            self._draw(**self.values())
        finally:
            self._busy = False

    def _fit_query_range(self, change) -> None:
        """A new seq_len sets the query slider's range; the needle query stays the needle query."""
        if change is None or change.owner is not self.controls["seq_len"]:
            return
        query = self.controls["query"]
        was_needle = query.value == needle_positions(change.old)[1]
        query.max = change.new - 1  # clamps the value
        if was_needle:
            query.value = needle_positions(change.new)[1]

    def _draw(self, preset, seq_len, block_size, top_k, head, query) -> None:
        key = (preset, seq_len, self.heads, self.head_dim, self.seed)
        sample = _sample(*key)
        mass, curves = _truth(*key, block_size)
        routing = route(sample.q, sample.k, block_size=block_size, top_k=top_k)
        if self._layout != (key, block_size, head):
            self._build(routing, mass, curves[head], block_size, top_k, head, query)
            self._layout = (key, block_size, head)
        else:
            self._refresh(routing, mass, block_size, top_k, head, query)
        png = io.BytesIO()
        self.figure.savefig(png, format="png")
        self.image.value = png.getvalue()
        self.summary.value = self._summary(sample, routing, mass, block_size, top_k, head, query)

    def _build(self, routing, mass, curve, block_size, top_k, head, query) -> None:
        """Draw every panel afresh (new data, block size or head)."""
        fig = self.figure
        fig.clear()
        grid = fig.add_gridspec(2, 3, width_ratios=(1.15, 1, 1), hspace=0.45, wspace=0.35,
                                left=0.06, right=0.98, top=0.9, bottom=0.08)
        self._axes = {"token": fig.add_subplot(grid[:, 0]), "scores": fig.add_subplot(grid[0, 1]),
                      "mass": fig.add_subplot(grid[1, 1]), "blocks": fig.add_subplot(grid[0, 2]),
                      "recall": fig.add_subplot(grid[1, 2])}
        plot_token_mask(routing, block_size, head, query=query, ax=self._axes["token"], legend=False)
        plot_block_map(routing, block_size, head, query=query, ax=self._axes["blocks"], legend=False)
        plot_recall({f"head {head}": curve}, top_k=top_k, ax=self._axes["recall"])
        self._draw_query_panels(routing, mass, block_size, top_k, head, query)
        fig.legend(handles=LEGEND, loc="upper center", ncol=len(LEGEND), fontsize=10, frameon=False)

    def _refresh(self, routing, mass, block_size, top_k, head, query) -> None:
        """Only top_k or the query changed: update the maps' data and markers in place (drawing
        matplotlib axes and their ticks afresh is most of an update's cost), redraw the two bar charts."""
        axes = self._axes
        axes["token"].images[0].set_data(token_states(routing, block_size, head).numpy())
        axes["blocks"].images[0].set_data(block_states(routing, block_size, head).numpy())
        for name in ("token", "blocks"):
            marker(axes[name], "query").set_ydata([query, query])
        marker(axes["recall"], "top_k").set_xdata([top_k, top_k])
        for name in ("scores", "mass"):
            axes[name].clear()
        self._draw_query_panels(routing, mass, block_size, top_k, head, query)

    def _draw_query_panels(self, routing, mass, block_size, top_k, head, query) -> None:
        plot_query_scores(routing, block_size, head, query, ax=self._axes["scores"], legend=False)
        plot_query_mass(routing, mass, block_size, head, query, top_k, ax=self._axes["mass"], legend=False)

    def save(self, path) -> None:
        """Write the current views as a PNG file (what `image` shows)."""
        self.figure.savefig(path)

    @staticmethod
    def _summary(sample, routing, mass, block_size, top_k, head, query) -> str:
        chosen = [int(j) for j in routing.indices[0, head, query] if j >= 0]
        kept = float(mass[0, head, query, chosen].sum())
        best = float(oracle_mass(mass[0, head], block_size, top_k)[query])
        row = block_row(block_states(routing, block_size, head)[query])
        needle = "" if sample.needle_key is None else (
            f" · needle key at s={sample.needle_key} (block {sample.needle_key // block_size}),"
            f" needle query t={sample.needle_query}")
        return (f"<b>query t={query}</b> (own block {query // block_size}) attends blocks {chosen} "
                f"and keeps {kept:.2f} of its attention (oracle: {best:.2f}){needle}<br>"
                f"<code style='font-size:15px'>blocks {row}</code>")


def explore(preset: str = "needle", **kwargs) -> Explorer:
    """Open the routing dashboard (display it as a cell's last expression). kwargs: seq_len, block_size,
    top_k, head, query, heads, head_dim, seed; see `Explorer`."""
    return Explorer(preset, **kwargs)
