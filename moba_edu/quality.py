"""How good is the router? Attention mass captured by the chosen blocks, against an oracle.

Full causal attention gives each query t a probability for every key; summing them per key block gives
the block's attention mass. The router picks `top_k` blocks (its own plus `top_k - 1` by gate) and
keeps only their mass. The oracle may look at the true attention: it keeps the own block (MoBA always
attends it) plus the `top_k - 1` earlier blocks with the most mass, the best any router could do with
the same number of blocks. Recall = router mass / oracle mass, 1 when the router chose as well as the
oracle. Both reach 1 when `top_k` covers every block.

Arithmetic only (no matplotlib), so training can log router recall; the figures live in
`moba_edu.viz.quality`.

Shapes: q [B, Hq, S, D], k [B, Hkv, S, D], probs [B, Hq, S, S], mass [..., S, N].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .checks.grading import exercise
from .routing import eligible, indices_to_mask, num_blocks, own_block, route, select_blocks


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Full causal softmax attention weights, float32 [B, Hq, S, S] (row t: query t over keys)."""
    S, D = q.shape[-2:]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # query head h reads key head h // g
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(D)
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


def block_mass(probs: torch.Tensor, block_size: int) -> torch.Tensor:
    """Attention mass per key block: probs [..., S, S] -> [..., S, N], summed over the block's keys."""
    S = probs.shape[-1]
    mass = probs.new_zeros(*probs.shape[:-1], num_blocks(S, block_size))
    return mass.index_add_(-1, own_block(S, block_size, probs.device), probs)  # key s lands in s // block_size


def oracle_order(mass: torch.Tensor, block_size: int, top_k: int) -> torch.Tensor:
    """The oracle's blocks: the router's own `select_blocks` with the true block mass in place of the
    gates. mass [..., S, N] -> int64 [..., S, min(top_k, N)], own block first, then by mass, then -1."""
    S = mass.shape[-2]
    gates = mass.masked_fill(~eligible(S, block_size, mass.device), float("-inf"))
    return select_blocks(gates, block_size, top_k)


@exercise("nb03.check_oracle_mass")
def oracle_mass(mass: torch.Tensor, block_size: int, top_k: int) -> torch.Tensor:
    """Best mass any MoBA router could keep: own block + the top_k - 1 richest eligible blocks.

    mass: [..., S, N] -> [..., S].
    """
    return routed_mass(mass, indices_to_mask(oracle_order(mass, block_size, top_k), mass.shape[-1]))


def routed_mass(mass: torch.Tensor, block_mask: torch.Tensor) -> torch.Tensor:
    """Mass kept by a choice of blocks: mass [..., S, N], bool block mask [..., S, N] -> [..., S]."""
    return (mass * block_mask).sum(-1)


@dataclass
class RecallCurve:
    """Mean over queries (and heads) of the attention mass kept, for top_k = 1 .. N.

    top_k: [N]; router, oracle: [N], mass kept in [0, 1]; recall: [N], mean of router / oracle per query.
    """

    top_k: list[int]
    router: list[float]
    oracle: list[float]
    recall: list[float]


def _kept_by_top_k(mass: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Mass kept by the first 1, 2, ... blocks of `order` (-1 = none): [..., S, N] each."""
    return mass.gather(-1, order.clamp_min(0)).masked_fill(order < 0, 0.0).cumsum(-1)


def recall_curve(q: torch.Tensor, k: torch.Tensor, block_size: int, queries=slice(None)) -> RecallCurve:
    """Router vs oracle mass for every top_k at once, averaged over `queries` (positions; default all).

    Both orders put the own block first and then the blocks best first, so the first top_k blocks of
    the order for top_k = N are the choice for top_k."""
    N = num_blocks(q.shape[-2], block_size)
    mass = block_mass(attention_probs(q, k), block_size)
    router = _kept_by_top_k(mass, route(q, k, block_size=block_size, top_k=N).indices)
    oracle = _kept_by_top_k(mass, oracle_order(mass, block_size, N))
    mean = lambda x: x[:, :, queries].mean((0, 1, 2)).tolist()  # noqa: E731  over batch, heads and queries
    # a query whose best blocks hold no mass at all (float32 underflow) was served as well as possible
    recall = torch.where(oracle > 0, router / oracle, 1.0)
    return RecallCurve(top_k=list(range(1, N + 1)), router=mean(router), oracle=mean(oracle), recall=mean(recall))


def token_recall(probs: torch.Tensor, index_scores: torch.Tensor, n_tokens: int, queries=slice(None)) -> float:
    """A token-level router (a learned indexer, DSA-style) against the token oracle, at n_tokens per query.

    probs: full causal attention [B, Hq, S, S]; index_scores [B, Hq, S, S] (any values; only their order
    among the keys before each query counts). Both choices keep the query's own token plus the
    n_tokens - 1 best earlier ones, the router by its scores and the oracle by the true attention
    (blocks of one key). Returns the mean over `queries` (positions), batch and heads of router mass /
    oracle mass: 1 when the indexer chose as well as the oracle.
    """
    S = probs.shape[-1]
    gates = index_scores.float().masked_fill(~eligible(S, 1, probs.device), float("-inf"))
    router = _kept_by_top_k(probs, select_blocks(gates, 1, n_tokens))[..., -1]
    oracle = _kept_by_top_k(probs, oracle_order(probs, 1, n_tokens))[..., -1]
    return torch.where(oracle > 0, router / oracle, 1.0)[:, :, queries].mean().item()
