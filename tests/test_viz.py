"""The routing views (moba_edu.viz): states, text map, oracle, recall, cost, presets, figures, dashboard.

Numbers are checked against tests/reference.py and brute force in float64; figures for labelled axes;
the dashboard for redrawing on every change (its speed is a benchmark: `python -m moba_edu.bench --cpu
--only explorer`).
"""

import itertools
import re
import subprocess
import sys

import matplotlib
import pytest
import torch
from hypothesis import assume, given

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

import moba_edu as me  # noqa: E402
from moba_edu import viz  # noqa: E402
from moba_edu.checks import Mistake, nb03  # noqa: E402
from moba_edu.viz import gallery, maps  # noqa: E402
from reference import assert_valid_mask, reference_routing_mask  # noqa: E402
from strategies import cases  # noqa: E402


def reference_probs(q, k):
    """Causal softmax attention weights in float64, [B, Hq, S, S], GQA by repeating k."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).double()
    S = q.shape[2]
    scores = (q.double() @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf")).softmax(-1)


def test_import_moba_edu_stays_light_and_viz_brings_the_views():
    code = ("import sys, moba_edu; before = [m for m in ('matplotlib', 'ipywidgets') if m in sys.modules]; "
            "import moba_edu.viz; after = [m for m in ('matplotlib', 'ipywidgets') if m in sys.modules]; "
            "print(before, after)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] ['matplotlib', 'ipywidgets']", out


@given(case=cases(max_s=40))
def test_block_and_token_states_show_the_routing(case):
    """The maps draw what the router chose (checked against the reference's rule here too)."""
    q, k, _ = case.tensors(torch.float32)
    routing = me.route(q, k, block_size=case.block_size, top_k=case.top_k)
    mask = routing.mask
    S, N = case.S, case.n_blocks
    t, j = torch.arange(S)[:, None], torch.arange(N)[None, :]
    for b, h in itertools.product(range(case.B), range(case.Hq)):
        assert_valid_mask(mask[b, h], q[b, h], k[b, h // (case.Hq // case.Hkv)], case.block_size, case.top_k)
        states = maps.block_states(routing, case.block_size, h, batch=b)
        attended = (states == maps.ROUTED) | (states == maps.OWN)
        assert torch.equal(attended, mask[b, h])
        assert torch.equal(states == maps.OWN, j == t // case.block_size)
        assert torch.equal(states == maps.FUTURE, j > t // case.block_size)
        tokens = maps.token_states(routing, case.block_size, h, batch=b)
        token_mask = mask[b, h].repeat_interleave(case.block_size, dim=1)[:, :S] & torch.ones(S, S).bool().tril()
        assert torch.equal((tokens == maps.ROUTED) | (tokens == maps.OWN), token_mask)


def test_text_block_map_rows():
    sample = viz.make_sample("needle", seq_len=128)
    routing = me.route(sample.q, sample.k, block_size=16, top_k=3)
    text = viz.text_block_map(routing, 16, head=1)
    lines = text.splitlines()
    assert len(lines) == 8  # one line per block: its last query
    for i, line in enumerate(lines):
        query, row = re.fullmatch(r"t=\s*(\d+) (\S+)", line).groups()
        assert int(query) == 16 * i + 15
        glyphs = [row[p:p + 2] for p in range(0, len(row), 2)]
        assert len(glyphs) == 8 and glyphs[i] == "██"  # own block attended
        assert glyphs.count("██") == min(3, i + 1) and glyphs.count("··") == 7 - i
    needle_row = viz.text_block_map(routing, 16, head=1, queries=[sample.needle_query]).rsplit(" ", 1)[1]
    assert needle_row[2 * (sample.needle_key // 16):][:2] == "██"


@pytest.mark.parametrize("seq_len,block_size", [(64, 8), (128, 16), (256, 32), (512, 64), (256, 8)])
def test_needle_query_routes_to_the_needle_block(seq_len, block_size):
    sample = viz.make_sample("needle", seq_len=seq_len, heads=3)
    routing = me.route(sample.q, sample.k, block_size=block_size, top_k=2)
    needle_block, query_block = sample.needle_key // block_size, sample.needle_query // block_size
    assert needle_block < query_block
    assert routing.indices[0, :, sample.needle_query].tolist() == [[query_block, needle_block]] * 3
    needle_weight = reference_probs(sample.q, sample.k)[0, :, sample.needle_query, sample.needle_key]
    assert (needle_weight > 0.99).all()  # the needle also holds the query's true attention


def test_presets_are_deterministic_and_shaped():
    for preset in viz.PRESETS:
        a, b = viz.make_sample(preset, seq_len=64, heads=2, head_dim=8, seed=3), viz.make_sample(
            preset, seq_len=64, heads=2, head_dim=8, seed=3)
        assert a.q.shape == a.k.shape == (1, 2, 64, 8) and a.q.dtype == torch.float32
        assert torch.equal(a.q, b.q) and torch.equal(a.k, b.k)
    with pytest.raises(ValueError, match="preset"):
        viz.make_sample("needles")


@given(case=cases(max_s=24))
def test_block_mass_and_oracle_against_brute_force(case):
    assume(case.n_blocks <= 8)  # brute force over every choice of blocks stays small
    q, k, _ = case.tensors(torch.float32)
    probs = reference_probs(q, k)
    mass = viz.block_mass(viz.attention_probs(q, k), case.block_size)
    S, N, bs = case.S, case.n_blocks, case.block_size
    expected = torch.stack([probs[..., j * bs:(j + 1) * bs].sum(-1) for j in range(N)], dim=-1)
    torch.testing.assert_close(mass.double(), expected, atol=1e-5, rtol=1e-5)
    oracle = viz.oracle_mass(expected, bs, case.top_k)
    for t in range(S):
        own = t // bs
        size = min(case.top_k - 1, own)  # the oracle keeps the own block and `size` earlier ones
        choices = itertools.combinations(range(own), size)
        best = torch.stack([expected[..., t, list(chosen)].sum(-1) for chosen in choices]).max(0).values
        torch.testing.assert_close(oracle[..., t], expected[..., t, own] + best)


def test_recall_curve_matches_routing_at_every_top_k():
    sample = viz.make_sample("random", seq_len=96, heads=2)
    bs = 16
    curve = viz.recall_curve(sample.q, sample.k, bs)
    mass = viz.block_mass(reference_probs(sample.q, sample.k), bs)
    assert curve.top_k == list(range(1, 7))
    for top_k, router, oracle in zip(curve.top_k, curve.router, curve.oracle):
        mask = me.route(sample.q, sample.k, block_size=bs, top_k=top_k).mask[0]
        for h in range(2):
            assert_valid_mask(mask[h], sample.q[0, h], sample.k[0, h], bs, top_k)
        assert router == pytest.approx(float((mass[0] * mask).sum(-1).mean()), abs=1e-5)
        assert router <= oracle + 1e-6
    assert curve.router[-1] == pytest.approx(1.0) and curve.oracle[-1] == pytest.approx(1.0)
    assert all(a <= b + 1e-6 for a, b in zip(curve.router, curve.router[1:]))
    assert all(0 < r <= 1 + 1e-6 for r in curve.recall) and curve.recall[0] == pytest.approx(1.0)


@given(case=cases(max_s=40))
def test_attended_pairs_counts_the_token_mask(case):
    q, k, _ = case.tensors(torch.float32)
    S = case.S
    # the count of attended pairs does not depend on which blocks win: a near-tie cannot change it
    mask = reference_routing_mask(q[0, 0], k[0, 0], case.block_size, case.top_k).repeat_interleave(case.block_size, dim=1)[:, :S]
    assert viz.attended_pairs(S, case.block_size, case.top_k) == int((mask & torch.ones(S, S).bool().tril()).sum())
    if case.top_k >= case.n_blocks:
        assert viz.density(S, case.block_size, case.top_k) == 1.0


def test_flops_add_up():
    f = viz.flops(8192, 512, 3, 128)
    assert f["moba"] == f["moba_attention"] + f["moba_router"] < f["dense"]
    assert f["dense"] == 4 * 128 * 8192 * 8193 // 2
    assert viz.density(8192, 512, 3) < 0.35  # about 3 of 16 blocks, plus the triangle of the early queries


def test_block_frequency_is_a_share_of_eligible_queries():
    sample = viz.make_sample("periodic", seq_len=128, heads=2)
    routing = me.route(sample.q, sample.k, block_size=16, top_k=3)
    freq = viz.block_frequency(routing, 16)
    assert freq.shape == (2, 7) and ((freq >= 0) & (freq <= 1)).all()
    for h, j in itertools.product(range(2), range(7)):
        queries = range(16 * (j + 1), 128)  # block j is eligible for queries of later blocks
        routed = sum(bool(routing.mask[0, h, t, j]) for t in queries)
        assert freq[h, j] == pytest.approx(routed / len(queries))


def axes_unlabelled(fig):
    """Names of the axes of `fig` that lack an x or y label (a colorbar needs only its own label)."""
    missing = []
    for ax in fig.axes:
        colorbar = ax.get_label() == "<colorbar>"
        labels = [ax.get_ylabel() or ax.get_xlabel()] if colorbar else [ax.get_xlabel(), ax.get_ylabel()]
        if not all(labels):
            missing.append(ax.get_title() or ax.get_label())
    return missing


@pytest.mark.parametrize("name", sorted(gallery.FIGURES))
def test_every_gallery_figure_has_labelled_axes(name):
    fig = gallery.FIGURES[name]()
    try:
        assert fig.axes and not axes_unlabelled(fig)
    finally:
        plt.close(fig)


def test_save_all_writes_the_gallery(tmp_path):
    written = gallery.save_all(tmp_path / "figs")
    assert [p.name for p in written] == [f"{name}.png" for name in gallery.FIGURES]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_explorer_views_change_together():
    ex = viz.explore()
    image, summary = ex.image.value, ex.summary.value
    ex.controls["top_k"].value = 2
    assert ex.image.value != image and ex.summary.value != summary
    sample = viz.make_sample("needle", seq_len=256)
    own, needle = sample.needle_query // 32, sample.needle_key // 32
    assert ex.controls["query"].value == sample.needle_query
    assert f"attends blocks [{own}, {needle}]" in ex.summary.value
    ex.controls["seq_len"].value = 128  # the needle query follows the sequence length
    assert ex.controls["query"].max == 127
    assert ex.controls["query"].value == viz.make_sample("needle", seq_len=128).needle_query
    ex.controls["query"].value = 5
    ex.controls["seq_len"].value = 64
    assert ex.controls["query"].value == 5
    ex.controls["preset"].value = "periodic"
    assert "needle" not in ex.summary.value
    assert not axes_unlabelled(ex.figure)


@pytest.mark.parametrize("control,values", [("top_k", (4, 2, 3)), ("query", (100, 200, 17)), ("head", (1, 2, 3))])
def test_explorer_redraws_on_every_change(control, values):
    """Every change of a control redraws the image, and the updated dashboard says what a dashboard
    opened at those values says. (How long an update takes is a benchmark, suite `explorer`.)"""
    ex = viz.explore()
    for value in values:
        image = ex.image.value
        ex.controls[control].value = value
        assert ex.values()[control] == value
        assert ex.image.value != image, f"setting {control} = {value} did not redraw"
    assert ex.summary.value == viz.explore(**{control: values[-1]}).summary.value


def needle_blocks_right(key, query, block_size, top_k):
    return {query // block_size} if top_k == 1 else {query // block_size, key // block_size}


@pytest.mark.parametrize("answer,mistake", [
    (lambda k, q, b, t: {k // b}, "own block is missing"),
    (lambda k, q, b, t: {q // b, k // b}, "top_k counts the own block"),
    (lambda k, q, b, t: {(s + 1) // b for s in (q, k)[:t]}, "not (s + 1) // block_size"),
    (lambda k, q, b, t: {-(-s // b) for s in (q, k)[:t]}, "ceil"),
    (lambda k, q, b, t: None, "is there a return"),
])
def test_nb03_needle_check_names_the_mistake(answer, mistake, capsys):
    nb03.check_needle_blocks(needle_blocks_right)
    assert capsys.readouterr().out.startswith("✓")
    with pytest.raises(Mistake, match=re.escape(mistake)):
        nb03.check_needle_blocks(answer)


def past_mass(mass, block_size):
    """mass [S, N] with the blocks after each query's own block zeroed (the own block kept)."""
    S, N = mass.shape
    return mass.masked_fill(torch.arange(N)[None, :] > (torch.arange(S) // block_size)[:, None], 0.0)


@pytest.mark.parametrize("answer,mistake", [
    (lambda m, b, t: past_mass(m, b).topk(min(t, m.shape[1]), -1).values.sum(-1), "not forced"),
    (lambda m, b, t: viz.oracle_mass(m, b, t + 1), "top_k counts the own block"),
    (lambda m, b, t: m[torch.arange(m.shape[0]), torch.arange(m.shape[0]) // b]
     + past_mass(m, b).topk(min(t - 1, m.shape[1]), -1).values.sum(-1), "treated as eligible"),
    (lambda m, b, t: m.sum(-1), "wrong kept mass"),
])
def test_nb03_oracle_check_names_the_mistake(answer, mistake, capsys):
    nb03.check_oracle_mass(viz.oracle_mass)
    assert capsys.readouterr().out.startswith("✓")
    with pytest.raises(Mistake, match=mistake):
        nb03.check_oracle_mass(answer)


@pytest.mark.parametrize("seq_len,block_size", [(64, 64), (512, 8)])
def test_explorer_at_one_block_and_at_many(seq_len, block_size):
    ex = viz.explore("periodic", seq_len=seq_len, block_size=block_size, top_k=8, query=seq_len - 1)
    assert not axes_unlabelled(ex.figure)
    sample = viz.make_sample("periodic", seq_len=seq_len)
    chosen = me.route(sample.q, sample.k, block_size=block_size, top_k=8).indices[0, 0, -1]
    assert f"attends blocks {[j for j in chosen.tolist() if j >= 0]}" in ex.summary.value
