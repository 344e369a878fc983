"""The SNR model of routing (moba_edu.snr): exact probabilities, and measurements that agree with them.

Measurements use fixed seeds (deterministic); they must fall within 4 binomial standard deviations
(plus 0.005) of the formula, a band a wrong formula (sqrt(B) for B, a missing 2, m ignored) leaves.
"""

import math

import pytest
import torch

from moba_edu import snr


def band(p, trials):
    return 4 * math.sqrt(p * (1 - p) / trials) + 0.005


def test_snr_formula():
    assert snr.snr(1.0, 64, 32) == pytest.approx(1.0)
    assert snr.snr(0.5, 64, 8, n_relevant=2) == pytest.approx(2.0)
    assert snr.pairwise_win(0.0) == pytest.approx(0.5)


@pytest.mark.parametrize("n_other, routed", [(7, 1), (15, 3), (3, 4)])
def test_found_probability_at_zero_signal_is_chance(n_other, routed):
    """With no signal every block is equally likely to be among the best `routed`: routed / (n_other + 1)."""
    assert snr.found_probability(0.0, n_other, routed) == pytest.approx(min(1, routed / (n_other + 1)), abs=1e-6)


def test_found_probability_with_one_rival_is_the_pairwise_win():
    assert snr.found_probability(0.8, 1, 1) == pytest.approx(snr.pairwise_win(0.8), abs=1e-6)


@pytest.mark.parametrize("block_size, head_dim, delta, n_relevant, routed", [
    (8, 32, 1.0, 1, 2), (32, 32, 1.5, 1, 1), (16, 16, 0.7, 3, 2), (4, 64, 0.5, 1, 4)])
def test_measured_routing_agrees_with_the_formula(block_size, head_dim, delta, n_relevant, routed):
    trials, n_blocks = 600, 12
    m = snr.measure(trials, n_blocks, block_size, head_dim, delta, routed, n_relevant, seed=block_size)
    s = snr.snr(delta, head_dim, block_size, n_relevant)
    win, found = snr.pairwise_win(s), snr.found_probability(s, n_blocks - 1, routed)
    assert abs(m.pairwise - win) < band(win, trials)  # pairs share trials: a loose but fair band
    assert abs(m.found - found) < band(found, trials)


def test_measurement_is_deterministic():
    a = snr.measure(100, 8, 8, 16, 1.0, 2, seed=5)
    b = snr.measure(100, 8, 8, 16, 1.0, 2, seed=5)
    assert a == b


def test_planted_keys_carry_the_signal():
    q, k, target = snr.planted(50, 6, 8, 32, delta=3.0, n_relevant=2, seed=1)
    dots = (k @ q[:, :, None]).squeeze(-1)  # [trials, S]
    best_two = dots.topk(2, dim=-1).indices // 8
    assert (best_two == target[:, None]).float().mean() > 0.95  # delta = 3 is 17 noise sigmas at d = 32
    with pytest.raises(ValueError, match="n_relevant"):
        snr.planted(5, 4, 4, 8, 1.0, n_relevant=5)


def test_identity_convolution_measures_like_the_mean():
    mean = snr.measure(300, 8, 8, 16, 1.0, 2, representative="mean", seed=2)
    conv = snr.measure(300, 8, 8, 16, 1.0, 2, representative=torch.tensor([0.0, 1.0]), seed=2)
    assert abs(mean.found - conv.found) <= 1 / 300 and abs(mean.pairwise - conv.pairwise) <= 1 / 300


def test_whole_block_relevance_favours_large_blocks():
    """m = B: the SNR is delta sqrt(d B / 2), growing with B (the opposite of one relevant key)."""
    small = snr.measure(400, 8, 4, 8, 0.25, 1, n_relevant=4, seed=3).found
    large = snr.measure(400, 8, 32, 8, 0.25, 1, n_relevant=32, seed=3).found
    assert large > small + 0.2
    with pytest.raises(ValueError, match="representative"):
        snr.block_gates(torch.ones(1, 4), torch.ones(1, 8, 4), 4, representative="median")
