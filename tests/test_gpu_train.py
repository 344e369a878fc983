"""Training on a GPU: the Triton rung inside the model under bfloat16 autocast, and a short h200 run."""

import pytest
import torch

from moba_edu.model import Model, ModelConfig
from moba_edu.train import make_config, train

pytestmark = pytest.mark.gpu


def test_moba_covering_every_block_matches_full_attention_in_bf16():
    torch.manual_seed(0)
    model = Model(ModelConfig(layers=("moba",) * 2, d_model=128, n_head=4, n_kv_head=2, block_size=64,
                              top_k=8)).cuda()
    tokens = torch.randint(0, 256, (2, 512), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        moba = model(tokens)
        model.set_layers(("full",) * 2)
        full = model(tokens)
    torch.testing.assert_close(moba, full, rtol=0.05, atol=0.05)  # bf16 attention, two code paths


def test_short_h200_run_lowers_the_loss(tmp_path):
    log = train(make_config("h200", "hybrid", steps=30, eval_every=15, eval_batch=4), progress=False)
    losses = [h["loss"] for h in log["history"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert all(0 < r <= 1 + 1e-4 for r in log["evals"][-1]["recall"])
