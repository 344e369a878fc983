"""`explore_model()`: the router of a trained model on real text, live, with standard ipywidgets only.

Sliders choose a layer, a head and a token (a byte) of the text. The model runs once, when the
dashboard opens (`text_routing.model_routing`: every layer's routing at the model's block_size and
top_k); moving a slider only redraws. Three views: a summary line, the text laid out one key block per
row with the blocks the token attends coloured (`text_routing.text_map_html`), and the block routing
map of the head with the token's scores (`maps.plot_block_map`, `scores.plot_query_scores`), rendered to
PNG like `explore()`'s dashboard. Question to ask it: does `return total` route to the block where
`total` was defined?
"""

from __future__ import annotations

import html
import io

import ipywidgets as widgets
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .maps import plot_block_map
from .scores import plot_query_scores
from .text_routing import attended_blocks, byte_glyphs, model_routing, text_map_html, text_tokens


class ModelExplorer(widgets.VBox):
    """The dashboard widget. `controls` maps "layer", "head" and "token" to their sliders; setting a
    value (by hand or in code) redraws `summary`, `text` and `image`. `routings[layer]` is the layer's
    `Routing` of the whole text; `tokens` int64 [1, S] the text's bytes."""

    def __init__(self, model, text: str | bytes, *, layer: int = 0, head: int = 0, token: int | None = None):
        self.model, self.tokens = model, text_tokens(text)
        self.block_size = model.cfg.block_size
        S, n_layer, n_head = self.tokens.shape[1], len(model.blocks), model.cfg.n_head
        token = S - 1 if token is None else token
        for name, value, count in (("layer", layer, n_layer), ("head", head, n_head), ("token", token, S)):
            if not isinstance(value, int) or not 0 <= value < count:
                raise ValueError(f"{name}: expected an int in 0..{count - 1}, got {value!r}")
        self.routings = model_routing(model, self.tokens)
        slider = dict(style={"description_width": "60px"}, continuous_update=False,
                      layout=widgets.Layout(width="420px"))
        self.controls = {
            "layer": widgets.IntSlider(value=layer, min=0, max=n_layer - 1, description="layer", **slider),
            "head": widgets.IntSlider(value=head, min=0, max=n_head - 1, description="head", **slider),
            "token": widgets.IntSlider(value=token, min=0, max=S - 1, description="token t", **slider),
        }
        self.summary, self.text = widgets.HTML(), widgets.HTML()
        self.image = widgets.Image(format="png", layout=widgets.Layout(width="100%", max_width="900px"))
        self.figure = Figure(figsize=(10, 3.6), dpi=80)
        FigureCanvasAgg(self.figure)
        super().__init__([widgets.HBox(list(self.controls.values())[:2]), self.controls["token"], self.summary,
                          self.text, self.image])
        for control in self.controls.values():
            control.observe(self.update, names="value")
        self.update()

    def values(self) -> dict:
        """The current control values, by control name."""
        return {name: control.value for name, control in self.controls.items()}

    def shown_blocks(self) -> list[int]:
        """The blocks the current token attends, as shown: own block first, then by descending gate."""
        v = self.values()
        return attended_blocks(self.routings[v["layer"]], v["head"], v["token"])

    def update(self, change=None) -> None:
        """Redraw every view from the current control values."""
        v = self.values()
        layer, head, token = v["layer"], v["head"], v["token"]
        routing = self.routings[layer]
        self.summary.value = self._summary(layer, head, token)
        self.text.value = text_map_html(self.tokens, routing, self.block_size, head, token)
        self.figure.clear()
        left, right = self.figure.subplots(1, 2, width_ratios=(1, 1.4),
                                           gridspec_kw=dict(left=0.07, right=0.98, bottom=0.14, top=0.9, wspace=0.3))
        plot_block_map(routing, self.block_size, head, query=token, ax=left)
        plot_query_scores(routing, self.block_size, head, token, ax=right)
        png = io.BytesIO()
        self.figure.savefig(png, format="png")
        self.image.value = png.getvalue()

    def _summary(self, layer: int, head: int, token: int) -> str:
        kind = self.model.layers[layer]
        note = "" if kind == "moba" else " (a full-attention layer: what MoBA would choose there)"
        char = html.escape(byte_glyphs(self.tokens[0, token:token + 1])[0])
        return (f"<b>layer {layer}, head {head}, token t={token} <code>{char}</code></b> (own block "
                f"{token // self.block_size}) attends blocks {self.shown_blocks()}{note}; "
                f"top_k={self.model.cfg.top_k}, block_size={self.block_size}")


def explore_model(model, text: str | bytes, *, layer: int = 0, head: int = 0,
                  token: int | None = None) -> ModelExplorer:
    """Open the trained-model dashboard on `text` (str as UTF-8, or bytes): display it as a cell's last
    expression. `model`: a `moba_edu.model.Model` (e.g. `moba_edu.train.load_model(path)`); `token`
    defaults to the last byte."""
    return ModelExplorer(model, text, layer=layer, head=head, token=token)
