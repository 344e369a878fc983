"""When does the router find the relevant block? MoBA's routing as a signal-to-noise problem.

FlashMoBA (Xiao et al., 2025, "Optimizing Mixture of Block Attention") models routing statistically.
Our version of the model, derived in notebook 10:

- a query q of unit length; irrelevant keys k ~ N(0, I/d), so q . k ~ N(0, 1/d) (keys of unit length
  on average, d = head_dim);
- m relevant keys, consecutive, inside one "target" block of B keys: each is an irrelevant key plus
  delta * q, so its affinity q . k is larger by delta on average.

The gate of a block is q . mean(k_block). For an irrelevant block it is N(0, 1/(d B)) exactly (a mean of
B independent N(0, 1/d)); the target block's gate is larger by m * delta / B. The gate difference of the
target and one random block has mean m delta / B and variance 2 / (d B), so

    SNR = (m delta / B) / sqrt(2 / (d B)) = m delta sqrt(d / (2 B))      (FlashMoBA's formula, m = 1)

and the target beats one given irrelevant block with probability Phi(SNR). It beats enough of the other
blocks to be routed (among the top r of n_other + 1) with probability `found_probability`. Both are exact
for Gaussian keys, so a measurement can be held to them.

The formula is about a FIXED number m of relevant keys: smaller blocks dilute them less. If relevance
fills the whole block (m = B) the SNR is delta sqrt(d B / 2) and grows with B: which one holds depends
on how relevant tokens cluster, which is what FlashMoBA's key convolution is meant to increase.

Shapes: q [trials, D], k [trials, n_blocks * block_size, D], gates [trials, n_blocks].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .routing import block_means
from .variants import block_max, causal_key_conv


def snr(delta: float, head_dim: int, block_size: int, n_relevant: int = 1) -> float:
    """m delta sqrt(d / (2 B)): the gate difference of the target and a random block, in noise units."""
    return n_relevant * delta * math.sqrt(head_dim / (2 * block_size))


def pairwise_win(snr_value: float) -> float:
    """Probability that the target block's gate beats one given irrelevant block's: Phi(SNR)."""
    return float(torch.special.ndtr(torch.tensor(snr_value, dtype=torch.float64)))


def found_probability(snr_value: float, n_other: int, routed: int) -> float:
    """Probability that the target block is among the `routed` largest of n_other + 1 gates.

    In units of one gate's noise sigma = 1/sqrt(d B), the target's gate is sqrt(2) SNR + X and the
    others' are Z_j, all N(0, 1) and independent. Given X = x, each Z_j beats the target with
    p(x) = Phi(-sqrt(2) SNR - x), so fewer than `routed` beat it with a binomial probability; integrate
    over x against the normal density (trapezoid rule on [-10, 10]; exact to ~1e-9 here).
    """
    x = torch.linspace(-10, 10, 4001, dtype=torch.float64)
    p = torch.special.ndtr(-math.sqrt(2) * snr_value - x)
    i = torch.arange(min(routed, n_other + 1), dtype=torch.float64)[:, None]  # 0 .. routed - 1 blocks above it
    log_comb = torch.lgamma(torch.tensor(n_other + 1.0)) - torch.lgamma(i + 1) - torch.lgamma(n_other - i + 1)
    pmf = torch.exp(log_comb + torch.xlogy(i, p) + torch.xlogy(n_other - i, 1 - p))
    density = torch.exp(-x**2 / 2) / math.sqrt(2 * math.pi)
    return float(torch.trapezoid(pmf.sum(0) * density, x))


def planted(trials: int, n_blocks: int, block_size: int, head_dim: int, delta: float, n_relevant: int = 1,
            seed: int = 0):
    """Random queries and keys with `n_relevant` consecutive relevant keys in one random target block.

    Returns q [trials, D] (unit length), k [trials, n_blocks * block_size, D] float32 and target
    int64 [trials], the target block of each trial. Deterministic given `seed`.
    """
    if not 1 <= n_relevant <= block_size:
        raise ValueError(f"n_relevant must be in 1 .. block_size = {block_size}, got {n_relevant}")
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(trials, head_dim, generator=gen, dtype=torch.float64), dim=-1)
    k = torch.randn(trials, n_blocks * block_size, head_dim, generator=gen) / math.sqrt(head_dim)
    target = torch.randint(n_blocks, (trials,), generator=gen)
    offset = torch.randint(block_size - n_relevant + 1, (trials,), generator=gen)
    positions = (target * block_size + offset)[:, None] + torch.arange(n_relevant)  # [trials, m]
    rows = torch.arange(trials)[:, None]
    q = q.float()
    k[rows, positions] += delta * q[:, None, :]
    return q, k, target


def block_gates(q: torch.Tensor, k: torch.Tensor, block_size: int, representative="mean") -> torch.Tensor:
    """q . rep(block) for every block: "mean" (MoBA), "max" (`variants.block_max`) or a convolution
    weight tensor [W] (`variants.causal_key_conv`, then the mean). -> float32 [trials, n_blocks]."""
    keys = k[:, None]  # [trials, 1, S, D]: one head
    if isinstance(representative, torch.Tensor):
        reps = block_means(causal_key_conv(keys, representative), block_size)
    elif representative == "mean":
        reps = block_means(keys, block_size)
    elif representative == "max":
        reps = block_max(keys, block_size)
    else:
        raise ValueError(f"representative must be 'mean', 'max' or a weight tensor, got {representative!r}")
    return (reps[:, 0] @ q[:, :, None]).squeeze(-1)


@dataclass
class Measured:
    """found: fraction of trials whose target block was among the `routed` best; pairwise: fraction of
    (target, other block) pairs in which the target's gate was larger."""

    found: float
    pairwise: float


def measure(trials: int, n_blocks: int, block_size: int, head_dim: int, delta: float, routed: int,
            n_relevant: int = 1, representative="mean", seed: int = 0) -> Measured:
    """Route a query that sees all `n_blocks` blocks (its own block comes after them) to `routed`
    blocks, `trials` times, and count how often the router finds the target block."""
    q, k, target = planted(trials, n_blocks, block_size, head_dim, delta, n_relevant, seed)
    gates = block_gates(q, k, block_size, representative)
    chosen = gates.topk(min(routed, n_blocks), dim=-1).indices
    found = (chosen == target[:, None]).any(-1).float().mean().item()
    mine = gates.gather(1, target[:, None])
    others = torch.ones_like(gates, dtype=torch.bool).scatter_(1, target[:, None], False)
    pairwise = ((mine > gates) & others).sum().item() / max(1, others.sum().item())
    return Measured(found=found, pairwise=pairwise)
