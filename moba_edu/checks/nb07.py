"""Checks for notebook 07 (MoBA backward): the attention backward of one tile from the saved
log-sum-exp, and a key block's dK, dV from the queries that routed to it (block-major, grouped heads).

The right answers come from autograd through a plain softmax; each planted mistake is the same
computation with one slip, so a wrong answer is named by the slip it reproduces.
"""

from __future__ import annotations

import torch

from . import expect, judge, passed


def _tile(gen, M, N, D, scale):
    """Random q [M, D], k, v [N, D], a mask with a visible key in every row, o and lse [M], do."""
    q, do = torch.randn(M, D, generator=gen, dtype=torch.float64), torch.randn(M, D, generator=gen, dtype=torch.float64)
    k, v = torch.randn(N, D, generator=gen, dtype=torch.float64), torch.randn(N, D, generator=gen, dtype=torch.float64)
    mask = torch.rand(M, N, generator=gen) < 0.6
    mask[torch.arange(M), torch.arange(M) % N] = True
    s = (scale * q @ k.T).masked_fill(~mask, float("-inf"))
    lse = s.logsumexp(dim=1)
    o = torch.exp(s - lse[:, None]) @ v
    return q, k, v, o, lse, do, mask


def _autograd(q, k, v, do, mask, scale):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    s = (scale * leaves[0] @ leaves[1].T).masked_fill(~mask, float("-inf"))
    return torch.autograd.grad(torch.softmax(s, dim=1) @ leaves[2], leaves, do)


def _backward(q, k, v, o, lse, do, mask, scale, delta_from="o", with_delta=True, from_lse=True, masked=True,
              scale_qk=True, scale_v=False):
    """The tile backward with optional slips (defaults: right)."""
    s = scale * q @ k.T
    p = torch.exp(s - lse[:, None]) if from_lse else torch.exp(s)
    if masked:
        p = p.masked_fill(~mask, 0.0)
    dp = do @ v.T
    delta = (do * o).sum(1) if delta_from == "o" else dp.sum(1)
    ds = p * (dp - delta[:, None]) if with_delta else p * dp
    factor = scale if scale_qk else 1.0
    return factor * ds @ k, factor * ds.T @ q, (scale if scale_v else 1.0) * p.T @ do


def _same(answer, right) -> bool:
    return all(a.shape == r.shape and torch.allclose(a.double(), r, rtol=1e-6, atol=1e-8)
               for a, r in zip(answer, right))


def check_attention_backward(fn) -> None:
    """fn(q, k, v, o, lse, do, mask, scale) -> (dq, dk, dv) of one attention tile.

    q, do, o [M, D]; k, v [N, D]; lse [M] the log-sum-exp of the scaled visible scores; mask bool [M, N].
    """
    gen = torch.Generator().manual_seed(7)
    M, N, D, scale = 6, 9, 5, 0.37
    args = _tile(gen, M, N, D, scale)
    q, k, v, o, lse, do, mask = args
    answer = fn(*(x.clone() for x in args), scale)
    expect(isinstance(answer, tuple) and len(answer) == 3, "return the three gradients: (dq, dk, dv)")
    shapes = [tuple(x.shape) for x in answer]
    expect(shapes == [(M, D), (N, D), (N, D)], f"dq should be [M, D] = [{M}, {D}], dk and dv [N, D] = [{N}, {D}]; "
           f"got {shapes} (dK = dS^T Q and dV = P^T dO: transpose the [M, N] tile)")
    expect(all(bool(torch.isfinite(x).all()) for x in answer),
           "NaN or inf: masked scores are -inf, so compute P = exp(s - lse) and then zero the masked entries")
    judge(answer, _autograd(q, k, v, do, mask, scale), {
        "dS = P * dP: the softmax's Jacobian subtracts each row's Delta = rowsum(dO * O): dS = P * (dP - Delta)":
            _backward(*args, scale, with_delta=False),
        "Delta = rowsum(dP): it is rowsum(P * dP), which equals rowsum(dO * O)":
            _backward(*args, scale, delta_from="dp"),
        "forgot the scale in dQ and dK: s = scale * q.k, so dQ = scale * dS K and dK = scale * dS^T Q":
            _backward(*args, scale, scale_qk=False),
        "scaled dV: the scale multiplies the scores, not the probabilities: dV = P^T dO":
            _backward(*args, scale, scale_v=True),
        "P = exp(s) is unnormalised: recompute the probabilities as exp(s - lse)":
            _backward(*args, scale, from_lse=False),
        "masked keys got probability: set P to 0 where mask is False (their scores are -inf)":
            _backward(*args, scale, masked=False),
    }, _same, "(dq, dk, dv) differ from autograd's: recompute P = exp(scale q k^T - lse) (0 where masked), "
       "then dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q")
    passed("the tile backward matches autograd, using only lse and Delta (no softmax)")


def _block_grads(q, do, lse, delta, chose, k, v, scale, heads=None, everyone=False, scale_k=True, with_delta=True):
    """dK, dV of one key block from its choosers, with optional slips (defaults: right)."""
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for h in range(q.shape[0]) if heads is None else heads:
        rows = torch.ones_like(chose[h]) if everyone else chose[h]
        p = torch.exp(scale * q[h, rows] @ k.T - lse[h, rows, None])
        ds = p * (do[h, rows] @ v.T - (delta[h, rows, None] if with_delta else 0))
        dv += p.T @ do[h, rows]
        dk += (scale if scale_k else 1.0) * ds.T @ q[h, rows]
    return dk, dv


def check_block_grads(fn) -> None:
    """fn(q, do, lse, delta, chose, k, v, scale) -> (dk, dv) of one routed key block.

    q, do [g, S, D] the g query heads sharing the block's key/value head; lse, delta [g, S]; chose bool
    [g, S], True where query t of head h routed to the block; k, v [W, D] the block's keys and values.
    """
    gen = torch.Generator().manual_seed(8)
    g, S, W, D, scale = 3, 20, 8, 5, 0.41
    q, do = (torch.randn(g, S, D, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(W, D, generator=gen, dtype=torch.float64) for _ in range(2))
    chose = torch.rand(g, S, generator=gen) < 0.4
    # Each query also attends keys outside this block, so its lse and Delta come from a larger key set.
    others = torch.randn(g, S, 12, generator=gen, dtype=torch.float64)
    scores = torch.cat([scale * q @ k.T, others], dim=-1).masked_fill(
        torch.cat([~chose[..., None].expand(g, S, W), torch.zeros(g, S, 12, dtype=torch.bool)], -1), float("-inf"))
    lse = scores.logsumexp(-1)
    delta = torch.randn(g, S, generator=gen, dtype=torch.float64)
    args = (q, do, lse, delta, chose, k, v)
    answer = fn(*(x.clone() for x in args), scale)
    expect(isinstance(answer, tuple) and len(answer) == 2, "return the block's two gradients: (dk, dv)")
    expect([tuple(x.shape) for x in answer] == [(W, D), (W, D)], f"dk and dv are the block's: [W, D] = [{W}, {D}]")
    judge(answer, _block_grads(*args, scale), {
        "only the first query head: the g heads of a group all read this key/value head, so dK and dV sum over "
        "every head's choosers": _block_grads(*args, scale, heads=[0]),
        "used every query: only the queries that routed to this block attend it (the `chose` rows)":
            _block_grads(*args, scale, everyone=True),
        "forgot the scale in dK: dK = scale * dS^T Q": _block_grads(*args, scale, scale_k=False),
        "dS without Delta: dS = P * (dP - Delta), Delta given per query":
            _block_grads(*args, scale, with_delta=False),
    }, _same, "(dk, dv) differ: for each head h and each query t that chose the block, P = exp(scale q_t k^T - "
       "lse_t), dV += P^T dO_t, dS = P (dO_t V^T - Delta_t), dK += scale dS^T q_t")
    passed("the block's dK and dV match, summed over the group's heads and the queries that chose it")
