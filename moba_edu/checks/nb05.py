"""Checks for notebook 05 (Triton primer): FlashAttention's online-softmax step, and a masked load for a
ragged tail in a Triton kernel.

The right answers come from PyTorch (softmax, logsumexp, max); each planted mistake is the same
computation with one slip, so a wrong answer is named by the slip it reproduces.
"""

from __future__ import annotations

import torch

from . import expect, judge, passed


def _update(m, l, acc, s, v, rescale_l=True, rescale_acc=True, flip=False, p_from_old_max=False,
            keep_old_max=False, normalise=False):
    """The online-softmax step with optional slips (all off: the right step)."""
    m_new = torch.maximum(m, s.max(dim=1).values)
    alpha = torch.exp(m_new - m) if flip else torch.exp(m - m_new)
    p = torch.exp(s - (m if p_from_old_max else m_new)[:, None])
    l_new = (l * alpha if rescale_l else l) + p.sum(dim=1)
    acc_new = (acc * alpha[:, None] if rescale_acc else acc) + p @ v
    if normalise:
        acc_new = acc_new / l_new[:, None]
    return (m if keep_old_max else m_new), l_new, acc_new


def _same_state(answer, right) -> bool:
    return all(a.shape == r.shape and torch.allclose(a.double(), r.double(), rtol=1e-4, atol=1e-5)
               for a, r in zip(answer, right))


def _run(fn, s, v, tile):
    """Fold the key tiles of s [M, S] and v [S, D] into (m, l, acc) with fn, starting from no keys."""
    M, D = s.shape[0], v.shape[1]
    state = (torch.full((M,), float("-inf")), torch.zeros(M), torch.zeros(M, D))
    for start in range(0, s.shape[1], tile):
        state = fn(*state, s[:, start:start + tile], v[start:start + tile])
    return state


def check_attention_update(fn) -> None:
    """fn(m, l, acc, s, v) -> (m, l, acc): one key tile of FlashAttention's online softmax.

    m, l [M] float32, acc [M, D], s [M, N] scaled scores (-inf where masked), v [N, D].
    """
    gen = torch.Generator().manual_seed(5)
    M, N, D = 6, 8, 4
    m = torch.randn(M, generator=gen)
    l = torch.rand(M, generator=gen) + 1
    acc = torch.randn(M, D, generator=gen)
    s = torch.randn(M, N, generator=gen) + torch.tensor([-3.0, 3.0]).repeat(M // 2)[:, None]  # some rows raise m
    v = torch.randn(N, D, generator=gen)
    answer = fn(m.clone(), l.clone(), acc.clone(), s, v)
    expect(isinstance(answer, tuple) and len(answer) == 3, "return the three running values: (m, l, acc)")
    expect(tuple(answer[2].shape) == (M, D), f"acc should stay [M, D] = [{M}, {D}]; got {list(answer[2].shape)} "
           "(p [M, N] @ v [N, D] gives [M, D])")
    judge(answer, _update(m, l, acc, s, v), {
        "forgot to rescale the running sum l by exp(m_old - m_new): it was summed relative to the old max":
            _update(m, l, acc, s, v, rescale_l=False),
        "forgot to rescale the accumulator acc by exp(m_old - m_new): its terms carry the old max":
            _update(m, l, acc, s, v, rescale_acc=False),
        "rescaled by exp(m_new - m_old): the factor is exp(m_old - m_new), at most 1":
            _update(m, l, acc, s, v, flip=True),
        "the new probabilities used the old max: p = exp(s - m_new)":
            _update(m, l, acc, s, v, p_from_old_max=True),
        "returned the old max: return m_new, the max over every key seen so far":
            _update(m, l, acc, s, v, keep_old_max=True),
        "acc was divided by l inside the step: keep it unnormalised, divide by l once after the last tile":
            _update(m, l, acc, s, v, normalise=True),
    }, _same_state, "(m, l, acc) after one tile differ from the online-softmax update: m_new = max(m, rowmax(s)), "
       "then rescale l and acc by exp(m - m_new) and add p = exp(s - m_new)")

    S = 24
    s = torch.randn(M, S, generator=gen) * 40           # scores in the hundreds would overflow a plain exp
    s[:, 8:] = s[:, 8:].masked_fill(torch.rand(M, S - 8, generator=gen) < 0.3, float("-inf"))
    v = torch.randn(S, D, generator=gen)
    m, l, acc = _run(fn, s, v, tile=8)
    expect(bool(torch.isfinite(m).all() & torch.isfinite(l).all() & torch.isfinite(acc).all()),
           "NaN or inf after several tiles: before the first tile m = -inf, so compute the factor as "
           "exp(m - m_new) (0 there), never exp(m) / exp(m_new); -inf scores must give p = 0")
    expect(torch.allclose(acc / l[:, None], s.softmax(-1) @ v, rtol=1e-4, atol=1e-5),
           "right for one tile but acc / l is not softmax(s) @ v after several: is the state carried over?")
    expect(torch.allclose(m + torch.log(l), s.logsumexp(-1), rtol=1e-5, atol=1e-4),
           "m + log(l) is not the log-sum-exp of all the scores")
    passed("the online-softmax step: acc / l = softmax(s) @ v and m + log(l) = logsumexp(s), tile by tile")


_TILE_MAX_HINTS = {
    "store": "you stored at out_ptr + offsets: one value per program goes to out_ptr + pid",
    "load": "mask missing: the last program loaded x past n; pass mask=offsets < n to tl.load",
}


def check_tile_max(kernel) -> None:
    """kernel[(cdiv(n, BLOCK),)](x_ptr, out_ptr, n, BLOCK=...): out[i] = max of tile i of x [n].

    Runs on the GPU when there is one, else under the interpreter, on guarded buffers (`sandbox`): a
    load or store out of bounds is named, never a crash."""
    for n, block in [(37, 16), (48, 16), (5, 8)]:
        tile_max_case(kernel, n, block, torch.Generator().manual_seed(n))
    passed("tile maxima right, ragged tail masked with -inf, nothing read or written out of bounds")


def tile_max_case(kernel, n: int, block: int, gen: torch.Generator) -> None:
    """Run the student's tile-max kernel once on guarded buffers (x [n], BLOCK=block); raise `Mistake`."""
    from . import sandbox

    sentinel = 1000.0
    tiles = -(-n // block)
    x, _ = sandbox.guarded((n,), torch.float32, sandbox.device(), fill=sentinel)  # past x: sentinels
    x.copy_(-1 - torch.rand(n, generator=gen))       # all negative: a padding 0 would win the max
    out, check_guards = sandbox.guarded((tiles,), torch.float32, sandbox.device())
    sandbox.run(lambda: kernel[(tiles,)](x, out, n, BLOCK=block), _TILE_MAX_HINTS, "tile_max_kernel")
    check_guards(_TILE_MAX_HINTS["store"])
    out, x = out.cpu(), x.cpu()
    right = torch.stack([x[i * block:(i + 1) * block].max() for i in range(tiles)])
    unwritten = out.isnan().nonzero().flatten().tolist()
    expect(not unwritten, f"tiles {unwritten} were not written: each program stores its max at out_ptr + pid")
    expect(not bool((out == sentinel).any()), _TILE_MAX_HINTS["load"])
    expect(not bool((out == 0).any()), "masked lanes were filled with 0 (tl.load's default `other`): a max "
           "needs other=-float('inf') so that padding never wins")
    expect(not (tiles > 1 and torch.equal(out, right[:1].expand(tiles))),
           "every program read the first tile: offsets start at pid * BLOCK")
    expect(torch.equal(out, right), f"n={n}, BLOCK={block}: tile maxima differ from x's; offsets should be "
           "pid * BLOCK + tl.arange(0, BLOCK)")
