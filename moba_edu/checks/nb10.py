"""Checks for notebook 10 (beyond MoBA): max-pooled block representatives, and the routing SNR.

Right answers come from the library (`variants.block_max`, `snr.snr`); each planted mistake is the same
computation with one slip, so a wrong answer is named by its slip.
"""

from __future__ import annotations

import math
import numbers

import torch

from ..routing import block_means
from ..snr import snr
from ..variants import block_max
from . import Mistake, expect, judge, passed


def _close(a, b) -> bool:
    return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-6)


def _is_number(x) -> bool:
    """A Python or NumPy number (not a bool)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_block_max(fn) -> None:
    """fn(k [S, D], block_size) -> [N, D]: the elementwise max of each block's keys (N = ceil(S / block_size))."""
    gen = torch.Generator().manual_seed(10)
    for S, block_size in [(12, 4), (14, 4), (9, 3), (5, 8)]:
        k = torch.randn(S, 6, generator=gen)
        k[(S - 1) // block_size * block_size:] -= 5.0      # a short last block of negative keys
        try:
            answer = fn(k.clone(), block_size)
        except NotImplementedError:
            raise
        except RuntimeError as err:   # e.g. a view of [S, D] as whole blocks when S does not divide
            raise Mistake(f"failed for S={S}, block_size={block_size}: {str(err).splitlines()[0]} "
                          "(the last block may be short: S need not divide by block_size)") from err
        right = block_max(k[None, None], block_size)[0, 0]
        expect(isinstance(answer, torch.Tensor), f"return a tensor [N, D], got {type(answer).__name__}")
        expect(answer.shape == right.shape,
               f"shape {tuple(answer.shape)}, expected [N, D] = {tuple(right.shape)}: the max runs over each "
               "block's tokens, keeping the D features (and a short last block still counts)")
        pad = torch.nn.functional.pad(k, (0, 0, 0, right.shape[0] * block_size - S))
        judge(answer, right, {
            "you took the mean: a max-pooled representative is the elementwise max over the block's keys":
                block_means(k[None, None], block_size)[0, 0],
            "max of |k|: keep the sign, the max of the keys themselves":
                block_max(k.abs()[None, None], block_size)[0, 0],
            "zero padding: a short last block's max is over its real keys only (pad with -inf, or slice)":
                pad.view(-1, block_size, 6).amax(1),
        }, _close, f"wrong representatives for S={S}, block_size={block_size}: max over keys "
           "j*block_size .. min((j+1)*block_size, S) - 1 of each feature")
    passed("max-pooled representatives: the elementwise max over each block's real keys")


def check_snr(fn) -> None:
    """fn(delta, head_dim, block_size, n_relevant) -> float: the SNR of the gate difference of the target
    block and one random block (notebook 10's derivation)."""
    # (1.0, 64, 32, 1) has d = 2B, where a missing square root goes unseen: the next case names it
    for delta, d, B, m in [(1.0, 64, 32, 1), (2.0, 128, 512, 3), (0.5, 32, 8, 2), (1.5, 32, 2, 1)]:
        answer = fn(delta, d, B, m)
        expect(_is_number(answer) or (isinstance(answer, torch.Tensor) and answer.numel() == 1),
               f"return a number, got {type(answer).__name__}")
        answer = float(answer)
        judge(answer, snr(delta, d, B, m), {
            "forgot the 2: the difference of TWO block gates has variance 2 / (d B)": m * delta * math.sqrt(d / B),
            "upside down: the noise of a block mean shrinks with d B, so the SNR grows with d":
                m * delta * math.sqrt(B / (2 * d)),
            "the signal of m keys in a mean of B is m delta / B, the noise 1 / sqrt(d B): SNR ~ 1/sqrt(B), not 1/B":
                m * delta * math.sqrt(d / 2) / B,
            "n_relevant ignored: m relevant keys lift the block's gate by m delta / B": delta * math.sqrt(d / (2 * B)),
            "delta left out of the signal: each relevant key adds delta to its affinity": m * math.sqrt(d / (2 * B)),
            "no square root: the noise is a standard deviation, the root of the variance of the difference":
                m * delta * d / (2 * B),
        }, lambda a, b: math.isclose(a, b, rel_tol=1e-6),
            f"wrong SNR for delta={delta}, d={d}, B={B}, m={m}: got {answer:.4g}, expected {snr(delta, d, B, m):.4g}; "
            "check the signal (m keys shifted by delta, averaged over B) and the noise (two block means)")
    passed("SNR = m delta sqrt(d / (2 B)): signal m delta / B over the noise sqrt(2 / (d B))")


def check_largest_block(fn) -> None:
    """fn(delta, head_dim, sizes, min_snr) -> the largest block size in `sizes` whose SNR (one relevant
    key) is at least `min_snr`."""
    for delta, d, sizes, min_snr in [(1.0, 64, [8, 16, 32, 64, 128], 1.2816), (0.5, 128, [4, 8, 16, 32], 1.2816),
                                     (2.0, 32, [16, 32, 64, 128, 256], 1.6449)]:
        answer = fn(delta, d, list(sizes), min_snr)
        expect(_is_number(answer) and answer in sizes, f"return one of the block sizes {sizes}, got {answer!r}")
        answer = int(answer)
        pick = lambda f: max((B for B in sizes if f(B) >= min_snr), default=None)  # noqa: E731
        judge(answer, pick(lambda B: snr(delta, d, B)), {
            "that is the block size that routes best (the smallest); the question asks for the largest that still "
            "reaches min_snr": min(sizes),
            "one size too large: did you drop the 2 in sqrt(d / (2 B)), or return the first size that fails "
            "instead of the last that passes?": pick(lambda B: delta * math.sqrt(d / B)),
        }, lambda a, b: a == b,
            f"wrong block size for delta={delta}, d={d}, sizes={sizes}: got {answer}; the question is the largest "
            f"size whose SNR with one relevant key is at least {min_snr}")
    passed("largest block size that still finds a lone relevant key: B <= d (delta / SNR)^2 / 2")
