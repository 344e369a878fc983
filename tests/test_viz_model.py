"""The routing views of a trained model on text (moba_edu.viz.text_routing, explore_model).

The captured q and k are checked against a float64 computation from the layer's weights (RoPE as a
complex rotation), the routing against the float64 reference rule (tests/reference.py), the shown
blocks and their text against `route` and the bytes; the dashboard for redrawing on every change; the
committed checkpoint for being the CLI's tiny MoBA run, small and tracked by git.
"""

import html
import re
import subprocess
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

import moba_edu as me  # noqa: E402
from moba_edu import metrics, viz  # noqa: E402
from moba_edu.model import Model, ModelConfig, rope_tables  # noqa: E402
from moba_edu.train import TINY_CHECKPOINT, load_model, make_config  # noqa: E402
from reference import assert_valid_mask  # noqa: E402

TEXT = ("def total_of(xs):\n    total = 0\n    for x in xs:\n        total += x\n"
        "    # a comment to move the return into a later block\n    return total\n")
EPS = torch.finfo(torch.float32).eps


def small_model(layers=("moba", "full")):
    torch.manual_seed(0)
    return Model(ModelConfig(layers=layers, d_model=32, n_head=4, n_kv_head=2, block_size=16, top_k=3)).eval()


def rope64(x: torch.Tensor, base: float) -> torch.Tensor:
    """x [B, H, S, Dh] float64 with pair (i, i + Dh/2) at position t turned by t * base^(-2i/Dh): a
    complex multiplication (the model uses cos/sin tables)."""
    S, Dh = x.shape[-2:]
    angle = torch.arange(S, dtype=torch.float64)[:, None] * base ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    z = torch.complex(*x.chunk(2, dim=-1)) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


@torch.no_grad()
def direct_qk(model, tokens):
    """Per layer, q [1, Hq, S, Dh] and k [1, Hkv, S, Dh] in float64 from the layer's normed input and its
    qkv weight; the next layer's input from the model's own block."""
    cfg, S = model.cfg, tokens.shape[1]
    Dh = cfg.d_model // cfg.n_head
    cos, sin = rope_tables(S, Dh, cfg.rope_base, tokens.device)
    x, out = model.embed(tokens), []
    for block in model.blocks:
        qkv = block.norm1(x).double() @ block.attn.qkv.weight.double().T
        q, k, _ = qkv.split([cfg.d_model, cfg.n_kv_head * Dh, cfg.n_kv_head * Dh], dim=-1)
        q = q.view(1, S, cfg.n_head, Dh).transpose(1, 2)
        k = k.view(1, S, cfg.n_kv_head, Dh).transpose(1, 2)
        out.append((rope64(q, cfg.rope_base), rope64(k, cfg.rope_base)))
        x = block(x, cos, sin)
    return out


def test_captured_qk_are_what_the_attention_layer_computes():
    model, tokens = small_model(), viz.text_tokens(TEXT)
    for (q, k), (q64, k64) in zip(metrics.capture_qk(model, tokens), direct_qk(model, tokens), strict=True):
        for got, want in ((q, q64), (k, k64)):
            assert got.dtype == torch.float32 and got.shape == want.shape
            torch.testing.assert_close(got.double(), want, rtol=0, atol=64 * EPS * want.abs().max().item())


def test_model_routing_is_moba_routing_of_every_layer():
    model, tokens = small_model(), viz.text_tokens(TEXT)
    routings = viz.model_routing(model, tokens)
    assert len(routings) == 2
    for routing, (q64, k64) in zip(routings, direct_qk(model, tokens)):
        assert routing.mask.shape == (1, 4, tokens.shape[1], -(-tokens.shape[1] // 16))
        for h in range(4):
            assert_valid_mask(routing.mask[0, h], q64[0, h], k64[0, h // 2], 16, 3)


def rows(markup: str) -> list[tuple[int, str, str]]:
    """(block, state, text) of every row of `text_map_html`, the text without markup."""
    found = re.findall(r"<div data-block='(\d+)' data-state='([^']+)'[^>]*>(.*?)</div>", markup)
    return [(int(j), state, html.unescape(re.sub(r"<[^>]+>", "", body).split("│", 1)[1])) for j, state, body in found]


def test_text_tokens_and_glyphs():
    tokens = viz.text_tokens("a\tb\nü")
    assert tokens.tolist() == [[97, 9, 98, 10, 0xC3, 0xBC]]
    assert viz.byte_glyphs(tokens) == ["a", "⇥", "b", "⏎", "·", "·"]
    with pytest.raises(ValueError, match="text"):
        viz.text_tokens("")
    with pytest.raises(TypeError, match="text"):
        viz.text_tokens(3)


@pytest.mark.parametrize("layer,head,token", [(0, 0, 100), (0, 3, 37), (1, 1, 129), (0, 2, 5)])
def test_shown_blocks_and_their_text_are_the_routers_choice(layer, head, token):
    model = small_model()
    ex = viz.explore_model(model, TEXT, layer=layer, head=head, token=token)
    q, k = metrics.capture_qk(model, viz.text_tokens(TEXT))[layer]
    chosen = [j for j in me.route(q, k, block_size=16, top_k=3).indices[0, head, token].tolist() if j >= 0]
    assert ex.shown_blocks() == chosen and chosen[0] == token // 16
    assert f"attends blocks {chosen}" in ex.summary.value
    shown = rows(ex.text.value)
    glyphs = viz.byte_glyphs(viz.text_tokens(TEXT))
    assert [j for j, _, _ in shown] == list(range(-(-len(glyphs) // 16)))  # every block, one row each
    for j, state, text in shown:
        assert text == "".join(glyphs[16 * j:16 * (j + 1)])
    assert [j for j, state, _ in shown if state == "own block"] == chosen[:1]
    assert sorted(j for j, state, _ in shown if state == "routed") == sorted(chosen[1:])
    assert all(state == "future" for j, state, _ in shown if j > token // 16)
    assert f"outline:2px solid #000'>{glyphs[token]}<" in ex.text.value


@pytest.mark.parametrize("control,values", [("layer", (1, 0)), ("head", (1, 2, 3)), ("token", (120, 64, 3))])
def test_model_explorer_redraws_on_every_change(control, values):
    """Every change redraws the views, and they say what a dashboard opened at those values says."""
    model = small_model()
    ex = viz.explore_model(model, TEXT, token=100)
    for value in values:
        before = (ex.image.value, ex.summary.value, ex.text.value)
        ex.controls[control].value = value
        assert ex.values()[control] == value
        assert ex.image.value != before[0] and ex.summary.value != before[1], f"{control} = {value}: no redraw"
        if control != "layer":  # the other layer may route this token the same way
            assert ex.text.value != before[2]
    fresh = viz.explore_model(model, TEXT, **{"token": 100, control: values[-1]})
    assert (ex.summary.value, ex.text.value) == (fresh.summary.value, fresh.text.value)


def test_model_explorer_names_a_full_layer_and_bad_controls():
    model = small_model()
    assert "full-attention layer" in viz.explore_model(model, TEXT, layer=1).summary.value
    assert "full-attention layer" not in viz.explore_model(model, TEXT, layer=0).summary.value
    for name, value in (("layer", 2), ("head", -1), ("token", len(TEXT))):
        with pytest.raises(ValueError, match=name):
            viz.explore_model(model, TEXT, **{name: value})


def test_committed_checkpoint_is_the_cli_tiny_moba_run():
    model = load_model(TINY_CHECKPOINT)
    assert model.cfg == make_config("tiny", "moba").model
    assert TINY_CHECKPOINT.stat().st_size < 4 * 2**20
    state = torch.load(TINY_CHECKPOINT, weights_only=False)
    assert state["config"]["steps"] == make_config("tiny", "moba").steps
    root = Path(__file__).resolve().parent.parent
    if (root / ".git").exists():  # a checkout: the file is committed, not ignored
        ignored = subprocess.run(["git", "check-ignore", "-q", str(TINY_CHECKPOINT)], cwd=root)
        assert ignored.returncode == 1, f"{TINY_CHECKPOINT} is excluded by .gitignore"
