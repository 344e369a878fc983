"""Checks for notebook 08 (training with MoBA): the layer pattern of a hybrid model and the
trailing-token loss.

Right answers come from the library (`model.hybrid_pattern`, `metrics.trailing_loss` of per-position
cross-entropy); each planted mistake is the same computation with one slip, named when it matches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..metrics import trailing_loss
from ..model import hybrid_pattern
from . import expect, judge, passed


def check_hybrid_pattern(fn) -> None:
    """fn(n_layer, last_full) -> sequence of "moba" / "full", one per layer, first layer first."""
    for n_layer, last_full in [(6, 2), (4, 1), (3, 0), (2, 2), (5, 3)]:
        answer = fn(n_layer, last_full)
        expect(isinstance(answer, (list, tuple)) and all(kind in ("moba", "full") for kind in answer),
               f"return a list of 'moba' / 'full', got {answer!r}")
        answer, right = tuple(answer), hybrid_pattern(n_layer, last_full)
        n_moba = n_layer - last_full
        judge(answer, right, {
            "the full-attention layers come last (the layers next to the output), not first":
                ("full",) * last_full + ("moba",) * n_moba,
            "moba and full are swapped: last_full counts the FULL layers at the end":
                ("full",) * n_moba + ("moba",) * last_full,
            "one layer too many or too few: the pattern has exactly n_layer entries, last_full of them full":
                ("moba",) * (n_moba - 1) + ("full",) * (last_full + 1),
            "off by one: exactly last_full layers are full (you made one more layer MoBA)":
                ("moba",) * (n_moba + 1) + ("full",) * (last_full - 1),
        }, lambda a, b: a == b, f"wrong pattern for n_layer={n_layer}, last_full={last_full}")
    passed("hybrid pattern: MoBA first, the last last_full layers full attention")


def _case(seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 10, 7, generator=gen) * 2
    targets = torch.randint(0, 7, (3, 10), generator=gen)
    return logits, targets


def check_trailing_loss(fn) -> None:
    """fn(logits [B, S, V], targets int64 [B, S], last) -> float: mean cross-entropy of the last `last`
    positions of every sequence."""
    for seed, last in [(1, 1), (0, 3), (2, 10), (3, 4)]:
        logits, targets = _case(seed)
        answer = fn(logits, targets, last)
        expect(isinstance(answer, (float, int)) or (isinstance(answer, torch.Tensor) and answer.numel() == 1),
               f"return one number, got {type(answer).__name__}")
        answer = float(answer)
        losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, S]
        right = trailing_loss(losses, last)
        judge(answer, right, {
            "you averaged every position: keep only the last `last` of each sequence, losses[:, -last:]":
                losses.mean().item(),
            "you took the first `last` positions: the trailing tokens are at the end, losses[:, -last:]":
                losses[:, :last].mean().item(),
            "you summed: take the mean over the batch and the last positions":
                losses[:, -last:].sum().item(),
            "you scored only one sequence: average over the whole batch":
                losses[-1, -last:].mean().item(),
            "you took the last rows of the batch, not the last positions: slice the position axis":
                losses[-last:].mean().item(),
        }, lambda a, b: abs(a - b) <= 1e-5 * max(1.0, abs(b)),
            f"wrong trailing loss for last={last}: mean of cross_entropy over positions S - last .. S - 1")
    passed("trailing loss: the mean cross-entropy of the last positions of every sequence")
