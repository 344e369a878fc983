"""The model's "dsa" layers (a learned lightning indexer picks each query's tokens, DeepSeek-V3.2's
sparse attention at course size) and token-level router recall, against independent references: full
causal attention, a per-row loop over the indexer's scores, and a loop for the token oracle."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moba_edu import metrics
from moba_edu.model import Model, ModelConfig
from moba_edu.quality import attention_probs, token_recall
from moba_edu.train import main, make_config

TOL = 1e-5  # float32 logits through different attention code paths


def dsa_model(layers=("dsa", "dsa"), top_k=2, seed=0, **kw):
    torch.manual_seed(seed)
    return Model(ModelConfig(layers=layers, d_model=32, n_head=4, n_kv_head=2, block_size=8, top_k=top_k, **kw)).eval()


def random_tokens(S, seed, B=2):
    return torch.randint(0, 256, (B, S), generator=torch.Generator().manual_seed(seed))


@settings(max_examples=8, deadline=None)
@given(S=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_dsa_with_every_token_chosen_is_full_attention(S, seed):
    """block_size * top_k >= S: every earlier token is chosen, so a "dsa" layer is full causal attention."""
    model = dsa_model(top_k=5, seed=seed % 7)     # 40 tokens per query
    tokens = random_tokens(S, seed)
    dsa = model(tokens)
    model.set_layers(("full", "full"))
    torch.testing.assert_close(dsa, model(tokens), rtol=TOL, atol=TOL)


@settings(max_examples=6, deadline=None)
@given(S=st.integers(2, 48), seed=st.integers(0, 2**16), n_tokens=st.integers(1, 12))
def test_chosen_tokens_are_own_plus_top_scores_and_causal(S, seed, n_tokens):
    model = dsa_model(seed=seed % 5)
    attn = model.blocks[0].attn
    attn.cfg.block_size, attn.cfg.top_k = n_tokens, 1   # n_tokens keys per query (block_size * top_k)
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 4, S, 8, generator=gen), torch.randn(1, 2, S, 8, generator=gen)
    mask = attn.chosen_tokens(q, k)
    with torch.no_grad():
        scores = attn.indexer(q, k).double()
    for h in range(4):
        for t in range(S):
            row = mask[0, h, t]
            assert row[t] and not row[t + 1:].any(), f"query {t}: own token missing or a future one chosen"
            assert row.sum() == min(t + 1, n_tokens)
            earlier = row[:t]
            if earlier.any() and (~earlier).any():   # every chosen earlier score beats every unchosen one
                assert scores[0, h, t, :t][earlier].min() >= scores[0, h, t, :t][~earlier].max() - 1e-6


def test_dsa_ignores_the_future():
    model = dsa_model()
    tokens = random_tokens(40, 1, B=1)
    changed = tokens.clone()
    changed[0, 25:] = (changed[0, 25:] + 1) % 256
    torch.testing.assert_close(model(changed)[0, :25], model(tokens)[0, :25], rtol=TOL, atol=TOL)
    assert (model(changed)[0, 25:] - model(tokens)[0, 25:]).abs().max() > 1e-3


def test_index_loss_trains_the_indexer_only():
    """In training mode a forward sets every indexer's KL to full attention (under "full" layers too:
    the dense warm-up); its gradient reaches the indexers and nothing else."""
    model = dsa_model(layers=("dsa", "full")).train()
    model(random_tokens(24, 2)).sum()      # the language-model output is left out of the backward
    loss = model.index_loss()
    assert loss is not None and loss.item() >= 0
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("indexer" in name), name
    model.eval()
    model(random_tokens(24, 2))
    assert model.index_loss() is None


def test_index_loss_is_the_kl_to_full_attention():
    model = dsa_model().train()
    attn = model.blocks[0].attn
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 4, 12, 8, generator=gen), torch.randn(1, 2, 12, 8, generator=gen)
    p = attention_probs(q, k).double()
    with torch.no_grad():
        scores = attn.indexer(q, k).double()
    kl = 0.0
    for h in range(4):
        for t in range(12):
            log_r = scores[0, h, t, :t + 1].log_softmax(-1)
            target = p[0, h, t, :t + 1]
            kl += (target * (target.clamp_min(1e-300).log() - log_r)).sum()
    assert attn.fit_indexer(q, k).item() == pytest.approx(kl.item() / 48, rel=1e-4, abs=1e-6)


def test_token_recall_against_a_loop():
    gen = torch.Generator().manual_seed(6)
    q, k = torch.randn(1, 2, 16, 8, generator=gen), torch.randn(1, 1, 16, 8, generator=gen)
    probs = attention_probs(q, k)
    scores = torch.randn(1, 2, 16, 16, generator=gen)
    n = 4
    ratios = []
    for h in range(2):
        for t in range(16):
            p, s = probs[0, h, t, :t].double(), scores[0, h, t, :t]
            chosen = p[s.argsort(descending=True)[:n - 1]].sum() + probs[0, h, t, t]
            best = p.sort(descending=True).values[:n - 1].sum() + probs[0, h, t, t]
            ratios.append((chosen / best).item())
    assert token_recall(probs, scores, n) == pytest.approx(sum(ratios) / len(ratios), rel=1e-5)
    assert token_recall(probs, probs.log(), n) == pytest.approx(1.0, abs=1e-6)   # the oracle's own order
    assert token_recall(probs, -probs, n) < 0.9                                  # the worst order


def test_set_layers_dsa_needs_indexers_and_full_then_dsa_builds_them():
    with pytest.raises(ValueError, match="layers"):
        dsa_model(layers=("moba", "full")).set_layers(("dsa", "dsa"))
    assert dsa_model(layers=("moba", "moba")).cfg.index_heads == 0
    cfg = make_config("tiny", "full-then-dsa", switch_at=0.25)
    assert cfg.model.layers == ("full", "full") and cfg.switch_layers == ("dsa", "dsa")
    assert cfg.model.index_heads == 4
    Model(cfg.model).set_layers(cfg.switch_layers)


def test_cli_trains_dsa_and_logs_index_loss_and_token_recall(tmp_path):
    main(["--config", "tiny", "--attn", "dsa", "--steps", "2", "--batch", "2", "--no-ckpt", "--no-progress",
          "--out", str(tmp_path)])
    log = json.loads((tmp_path / "tiny-dsa.json").read_text())
    assert all(h["index_loss"] >= 0 for h in log["history"])
    assert [len(e["recall"]) for e in log["evals"]] == [2, 2]
    assert all(0 < r <= 1 + 1e-5 for e in log["evals"] for r in e["recall"])


def test_router_recall_scores_a_dsa_layer_by_its_tokens():
    model = dsa_model(layers=("dsa", "moba"))
    tokens = random_tokens(32, 3, B=1)
    assert metrics.router_recall(model, tokens, 8, 4) == pytest.approx([1.0, 1.0], abs=1e-5)  # 32 tokens: all
    q, k = metrics.capture_qk(model, tokens)[0]
    with torch.no_grad():
        expected = token_recall(attention_probs(q, k), model.blocks[0].attn.indexer(q, k), 16, slice(16, None))
    assert metrics.router_recall(model, tokens, 8, 2)[0] == pytest.approx(expected, rel=1e-6)
