"""Hidden tests for notebook 08 (training with MoBA): the hybrid layer pattern, the trailing-token loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...metrics import trailing_loss
from ...model import hybrid_pattern
from . import agree, generator, randint


def check_hybrid_pattern(fn) -> None:
    gen = generator("nb08.check_hybrid_pattern")
    cases = [(1, 0), (1, 1)] + [(n, randint(gen, 0, n)) for n in (randint(gen, 2, 40) for _ in range(4))]
    for n_layer, last_full in cases:
        agree(fn(n_layer, last_full), hybrid_pattern(n_layer, last_full),
              lambda a, b: isinstance(a, (list, tuple)) and tuple(a) == b, f"n_layer={n_layer}, last_full={last_full}")


def check_trailing_loss(fn) -> None:
    gen = generator("nb08.check_trailing_loss")
    for _ in range(3):
        B, S, V = randint(gen, 1, 5), randint(gen, 1, 30), randint(gen, 2, 50)
        last = randint(gen, 1, S)
        logits = torch.randn(B, S, V, generator=gen) * 3
        targets = torch.randint(0, V, (B, S), generator=gen)
        right = trailing_loss(F.cross_entropy(logits.transpose(1, 2), targets, reduction="none"), last)
        agree(float(fn(logits.clone(), targets.clone(), last)), right, lambda a, b: abs(a - b) <= 1e-5 * max(1.0, abs(b)),
              f"logits [{B}, {S}, {V}], last={last}")
