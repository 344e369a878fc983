"""The training helpers: model (per-layer attention), data (corpus split, retrieval pairs), metrics,
the training loop and CLI, and data-parallel FSDP2 under torchrun (gloo on the CPU)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moba_edu import data, metrics
from moba_edu.model import Model, ModelConfig, hybrid_pattern
from moba_edu.train import evaluate, load_model, main, make_config, train, train_batch

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # float32 model outputs compared across code paths (SDPA vs the MoBA torch rung)


def tiny_model(layers, **kw):
    torch.manual_seed(0)
    return Model(ModelConfig(layers=layers, d_model=32, n_head=4, n_kv_head=2, block_size=8, **kw)).eval()


def test_hybrid_pattern_puts_full_attention_last():
    assert hybrid_pattern(4, 1) == ("moba", "moba", "moba", "full")
    assert hybrid_pattern(3, 0) == ("moba",) * 3 and hybrid_pattern(2, 2) == ("full",) * 2
    with pytest.raises(ValueError, match="last_full"):
        hybrid_pattern(2, 3)


def test_bad_config_and_tokens_are_named():
    with pytest.raises(ValueError, match="layers"):
        ModelConfig(layers=("moba", "sparse"))
    with pytest.raises(ValueError, match="n_head"):
        ModelConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="tokens"):
        tiny_model(("full",))(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="layers"):
        tiny_model(("full",)).set_layers(("full", "moba"))


@settings(max_examples=8, deadline=None)
@given(S=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_moba_covering_every_block_is_full_attention(S, seed):
    """top_k >= number of blocks makes MoBA full causal attention (docs/design.md §1): same weights, same logits."""
    tokens = torch.randint(0, 256, (2, S), generator=torch.Generator().manual_seed(seed))
    moba = tiny_model(("moba", "moba"), top_k=8)  # 5 blocks of 8 at most
    full = tiny_model(("full", "full"), top_k=8)
    torch.testing.assert_close(moba(tokens), full(tokens), rtol=TOL, atol=TOL)


def test_block_local_moba_differs_from_full_only_after_the_first_block():
    model = tiny_model(("moba",), top_k=1)
    tokens = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))
    moba = model(tokens)
    model.set_layers(("full",))
    full = model(tokens)
    torch.testing.assert_close(moba[:, :8], full[:, :8], rtol=TOL, atol=TOL)  # own block = everything there
    assert (moba[:, 8:] - full[:, 8:]).abs().amax() > 100 * TOL


def test_split_is_disjoint_deterministic_and_by_path():
    files = data.stdlib_files()
    assert list(files) == sorted(files) and not any("/test/" in f or f.startswith("test/") for f in files)
    val = [f for f in files if data.split_of(f) == "val"]
    assert 0.03 < len(val) / len(files) < 0.2
    assert data.split_of("json/__init__.py") == data.split_of("json/__init__.py")
    zeros = int((data.corpus("val") == 0).sum())
    assert zeros >= len(val)  # one separator per file (a file may hold 0 bytes itself, rarely)
    with pytest.raises(ValueError, match="split"):
        data.corpus("test")


@settings(max_examples=10, deadline=None)
@given(S=st.integers(12, 80), seed=st.integers(0, 2**16), data_=st.data())
def test_needle_sits_at_its_distance(S, seed, data_):
    gen = torch.Generator().manual_seed(seed)
    distance = data_.draw(st.integers(3, S - 2))
    tokens, answer = data.insert_pairs(data.text_batch(data.corpus("val"), 3, S, gen), 1, gen, distance)
    for row, ask in zip(tokens, answer):
        (at,) = ask.nonzero().flatten().tolist()             # input position of the query's key
        assert at == S - 1 and row[at - 1] == data.QUERY     # the query ends the sequence
        assert row[at - distance - 1] == data.KEY and row[at - distance] == row[at]  # same key
        assert row[at + 1] == row[at - distance + 1]         # the target is the pair's value


def test_pairs_have_distinct_keys_and_are_all_asked():
    gen = torch.Generator().manual_seed(0)
    tokens, answer = data.insert_pairs(data.text_batch(data.corpus("val"), 4, 128, gen), 8, gen)
    for row, ask in zip(tokens, answer):
        asked = {(row[i].item(), row[i + 1].item()) for i in ask.nonzero().flatten().tolist()}
        stored = {(row[i + 1].item(), row[i + 2].item()) for i in range(128 - 2) if row[i] == data.KEY}
        assert len(asked) == 8 and asked <= stored
    with pytest.raises(ValueError, match="n_pairs"):
        data.insert_pairs(tokens, 50, gen)
    with pytest.raises(ValueError, match="distance"):
        data.insert_pairs(tokens, 1, gen, distance=2)


def test_trailing_loss_and_loss_by_position():
    losses = torch.arange(12.0).view(2, 6)
    assert metrics.trailing_loss(losses, 2) == pytest.approx((4 + 5 + 10 + 11) / 4)
    assert metrics.loss_by_position(losses, 3) == pytest.approx([3.5, 5.5, 7.5])
    with pytest.raises(ValueError, match="last"):
        metrics.trailing_loss(losses, 7)


def test_router_recall_is_one_when_top_k_covers_every_block():
    model = tiny_model(("moba", "full"))
    tokens = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(2))
    assert metrics.router_recall(model, tokens, 8, 4) == pytest.approx([1.0, 1.0], abs=1e-5)
    recall = metrics.router_recall(model, tokens, 8, 2)
    assert all(0 < r <= 1 + 1e-5 for r in recall)
    assert all(attn.last_qk is None for attn in (b.attn for b in model.blocks))  # nothing left captured


def test_tiny_training_lowers_the_loss_logs_and_checkpoints(tmp_path):
    cfg = make_config("tiny", "hybrid", steps=40, eval_every=20)
    log = train(cfg, tmp_path, ckpt_dir=tmp_path, progress=False)
    losses = [h["loss"] for h in log["history"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    assert [e["step"] for e in log["evals"]] == [0, 20, 40]
    assert log["evals"][-1]["val_loss"] < log["evals"][0]["val_loss"]
    assert set(log["evals"][-1]["retrieval"]) == {str(d) for d in cfg.distances}
    assert json.loads((tmp_path / "tiny-hybrid.json").read_text())["history"] == log["history"]
    model = load_model(tmp_path / "tiny-hybrid.pt")
    assert model.layers == ("moba", "full")
    again = evaluate(model, cfg, torch.device("cpu"))["val_loss"]
    assert again == pytest.approx(log["evals"][-1]["val_loss"], rel=1e-5)


def test_training_is_seeded_and_switches_layers():
    """Same seed: the same batches (bitwise) and the same losses up to float rounding (CPU kernels may
    round differently with the memory alignment of a tensor)."""
    cfg = make_config("tiny", "moba-then-full", steps=6, eval_every=3, switch_at=0.5)
    batches = [train_batch(cfg, torch.Generator().manual_seed(cfg.seed)) for _ in range(2)]
    assert torch.equal(*batches)  # same code twice
    first, second = train(cfg, progress=False), train(cfg, progress=False)
    assert [h["loss"] for h in first["history"]] == pytest.approx([h["loss"] for h in second["history"]], abs=1e-5)
    assert [e["layers"] for e in first["evals"]] == [("moba",) * 2, ("full",) * 2, ("full",) * 2]


def test_cli_throughput_writes_json(tmp_path, capsys):
    main(["--config", "tiny", "--steps", "5", "--throughput", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "throughput-tiny-moba-1.json").read_text())
    assert len(result["step_seconds"]) == 5 and result["tokens_per_step"] == 8 * 256
    assert result["median_step_s"] == sorted(result["step_seconds"][3:])[1]   # the median past 3 warm-up steps
    assert result["tokens_per_s"] == pytest.approx(result["tokens_per_step"] / result["median_step_s"])


def test_bad_config_names_are_named():
    with pytest.raises(ValueError, match="config"):
        make_config("huge")
    with pytest.raises(ValueError, match="attn"):
        make_config("tiny", "sparse")


def test_importable_without_matplotlib():
    code = ("import sys; sys.modules['matplotlib'] = sys.modules['ipywidgets'] = None; "
            "import moba_edu.train, moba_edu.metrics, moba_edu.model, moba_edu.data")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_two_gloo_processes_follow_one_process(tmp_path):
    """torchrun with 2 ranks (FSDP2, gloo) and the same global batch: the same losses up to float32
    rounding of the gradient all-reduce (measured ~5e-7; the tolerance allows 100x that)."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    args = ["-m", "moba_edu.train", "--config", "tiny", "--steps", "4", "--no-progress", "--no-ckpt"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    subprocess.run([torchrun, "--nproc-per-node", "2", *args, "--out", str(tmp_path / "two")],
                   check=True, env=env, cwd=tmp_path, capture_output=True)
    subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], check=True, env=env, cwd=tmp_path)
    one, two = (json.loads((tmp_path / n / "tiny-moba.json").read_text()) for n in ("one", "two"))
    assert two["env"]["world"] == 2 and one["env"]["world"] == 1
    # each log names the command that reproduces it
    assert one["env"]["command"] == f"python -m moba_edu.train {' '.join(args[2:])} --out {tmp_path / 'one'}"
    assert two["env"]["command"].startswith("torchrun --nproc-per-node 2 -m moba_edu.train --config tiny")
    assert [h["loss"] for h in two["history"]] == pytest.approx([h["loss"] for h in one["history"]], abs=5e-5)
    assert two["evals"][-1]["val_loss"] == pytest.approx(one["evals"][-1]["val_loss"], abs=5e-5)
