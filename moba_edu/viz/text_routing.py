"""A trained model's router on a text: which blocks of real bytes a token routes to, shown as text.

`model_routing` runs the model once on a byte text and routes every layer's rotated q and k (captured
by `metrics.capture_qk`, the same capture the training loop's router recall uses) with `route` at the
model's own block_size and top_k: exactly the choice its MoBA layers make. A full-attention layer
gets the routing MoBA would make there. `text_map_html` lays the text out one key block per row,
each row coloured by what the chosen token does with it (the colours of `maps`), its own block cut
at the token.

Shapes: tokens int64 [1, S] (bytes); one `Routing` per layer of q [1, Hq, S, Dh].
"""

from __future__ import annotations

import html

import torch
from matplotlib.colors import to_rgb

from ..metrics import capture_qk
from ..routing import Routing, route
from .maps import FUTURE, OWN, ROUTED, SKIPPED, STATE_COLORS, STATE_NAMES, block_states

GLYPHS = {10: "⏎", 9: "⇥", 0: "␀"}  # bytes drawn as a sign: newline, tab, the corpus's file separator


def text_tokens(text: str | bytes) -> torch.Tensor:
    """The bytes of `text` (str: UTF-8) as int64 [1, S]."""
    if isinstance(text, str):
        text = text.encode()
    if not isinstance(text, (bytes, bytearray)):
        raise TypeError(f"text: expected str or bytes, got {type(text).__name__}")
    if not text:
        raise ValueError("text: expected at least one byte, got an empty text")
    return torch.tensor(list(text), dtype=torch.long)[None]


def byte_glyphs(tokens: torch.Tensor) -> list[str]:
    """One visible character per byte of tokens [S] (or [1, S]): printable ASCII as itself, newline ⏎,
    tab ⇥, 0 ␀, any other byte · (so position t is character t)."""
    return [chr(b) if 32 <= b < 127 else GLYPHS.get(b, "·") for b in tokens.flatten().tolist()]


@torch.no_grad()
def model_routing(model, tokens: torch.Tensor) -> list[Routing]:
    """One forward pass of `model` on tokens int64 [1, S]; per layer, the `Routing` of its rotated q and k
    at the model's block_size and top_k (what its MoBA layers attend; for a full layer, what they would),
    on the CPU."""
    cfg, device = model.cfg, next(model.parameters()).device
    return [route(q.float().cpu(), k.float().cpu(), block_size=cfg.block_size, top_k=cfg.top_k)
            for q, k in capture_qk(model, tokens.to(device))]


def attended_blocks(routing: Routing, head: int, token: int) -> list[int]:
    """The key blocks query `token` of `head` attends: its own block first, then the routed blocks by
    descending gate (`Routing.indices` without the -1 padding)."""
    return [j for j in routing.indices[0, head, token].tolist() if j >= 0]


def _tint(state: int, alpha: float = 0.3) -> str:
    r, g, b = (round(255 * c) for c in to_rgb(STATE_COLORS[state]))
    return f"rgba({r},{g},{b},{alpha})"


def text_map_html(tokens: torch.Tensor, routing: Routing, block_size: int, head: int, token: int) -> str:
    """The text of tokens [1, S], one key block per row (`data-block`, `data-state` attributes): the
    query `token` (outlined) attends the orange own block up to itself and the blue routed blocks
    (rank and gate shown); grey blocks are skipped, faint ones in its future."""
    glyphs = byte_glyphs(tokens)
    states = block_states(routing, block_size, head)[token].tolist()
    gates = routing.gates[0, head, token].tolist()
    rank = {j: r for r, j in enumerate(attended_blocks(routing, head, token))}
    width = len(str(len(glyphs) - 1))
    rows = []
    for j, state in enumerate(states):
        start, stop = j * block_size, min((j + 1) * block_size, len(glyphs))
        label = {OWN: "own block", ROUTED: f"routed #{rank.get(j)} gate {gates[j]:.3g}",
                 SKIPPED: f"skipped gate {gates[j]:.3g}", FUTURE: "future"}[state]
        chars = []
        for s in range(start, stop):
            char = html.escape(glyphs[s])
            if s == token:
                char = f"<b style='outline:2px solid #000'>{char}</b>"
            elif s > token:
                char = f"<span style='color:#aaa'>{char}</span>"
            chars.append(char)
        style = f"background:{_tint(state)};white-space:pre;margin:1px 0;padding:0 4px"
        rows.append(f"<div data-block='{j}' data-state='{STATE_NAMES[state]}' style='{style}'>"
                    f"{j:>3} [{start:>{width}}-{stop - 1:>{width}}] {label:<26}│{''.join(chars)}</div>")
    return f"<div style='font-family:monospace;font-size:13px'>{''.join(rows)}</div>"
