"""Checks for notebook 07 (MoBA backward): the attention backward of one tile from the saved
log-sum-exp, a key block's dK, dV from the queries that routed to it (block-major, grouped heads), and
the same step in Triton (`dkdv_step` of moba_edu/kernels/teaching.py).

The right answers come from autograd through a plain softmax in float64; each planted mistake is the
same computation with one slip, so a wrong answer is named by the slip it reproduces. The tile
backward runs with softmax and logsumexp disabled: calling them is named as the mistake.
"""

from __future__ import annotations

import torch

import math

from . import expect, forbidden, judge, passed, sandbox


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


_SOFTMAX = "you called {}: the backward recomputes P = exp(scale q k^T - lse) from the saved lse, no softmax"
_NO_SOFTMAX = {name: _SOFTMAX.format(name) for name in (
    "torch.softmax", "torch.Tensor.softmax", "torch.nn.functional.softmax", "torch.special.softmax",
    "torch.log_softmax", "torch.Tensor.log_softmax", "torch.nn.functional.log_softmax",
    "torch.logsumexp", "torch.Tensor.logsumexp")}


def check_attention_backward(fn) -> None:
    """fn(q, k, v, o, lse, do, mask, scale) -> (dq, dk, dv) of one attention tile.

    q, do, o [M, D]; k, v [N, D]; lse [M] the log-sum-exp of the scaled visible scores; mask bool [M, N].
    """
    gen = torch.Generator().manual_seed(7)
    M, N, D, scale = 6, 9, 5, 0.37
    args = _tile(gen, M, N, D, scale)
    q, k, v, o, lse, do, mask = args
    with forbidden(_NO_SOFTMAX):
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


def _tile_grads(q, do, rows, k, v, key0, scale, seed):
    """A block's keys at key0.. seen causally by query positions `rows`, each also attending 6 keys outside
    the block: returns lse, delta [S] (zero off rows) and autograd's dk, dv of the block (float64)."""
    gen = torch.Generator().manual_seed(seed)
    S, D = q.shape
    others_k, others_v = (torch.randn(len(rows), 6, D, generator=gen, dtype=torch.float64) for _ in range(2))
    k_leaf, v_leaf = k.clone().requires_grad_(), v.clone().requires_grad_()
    hidden = (key0 + torch.arange(len(k)))[None, :] > rows[:, None]
    s = torch.cat([(scale * q[rows] @ k_leaf.T).masked_fill(hidden, -math.inf),
                   scale * torch.einsum("rd,rnd->rn", q[rows], others_k)], dim=1)
    o = torch.einsum("rn,rnd->rd", torch.softmax(s, 1), torch.cat([v_leaf.expand(len(rows), -1, -1), others_v], 1))
    lse, delta = torch.zeros(S, dtype=torch.float64), torch.zeros(S, dtype=torch.float64)
    lse[rows], delta[rows] = s.logsumexp(1).detach(), (do[rows] * o).sum(1).detach()
    dk, dv = torch.autograd.grad(o, [k_leaf, v_leaf], do[rows])
    return lse, delta, dk, dv


def _tile_slipped(q, do, lse, delta, rows, k, v, key0, scale, slip, pad_to=16):
    """dk, dv of the Triton harness with one slip: "no delta", "unscaled dk", "scaled dv", "no lse",
    "unmasked" (the harness's padding rows, query 0 repeated, count too)."""
    if slip == "unmasked":
        rows = torch.cat([rows, rows.new_zeros(-len(rows) % pad_to)])
    s = scale * q[rows] @ k.T
    p = torch.exp(s - (0 if slip == "no lse" else lse[rows, None]))
    if slip != "unmasked":
        p = p.masked_fill((key0 + torch.arange(len(k)))[None, :] > rows[:, None], 0.0)
    ds = p * (do[rows] @ v.T - (0 if slip == "no delta" else delta[rows, None]))
    return (1.0 if slip == "unscaled dk" else scale) * ds.T @ q[rows], (scale if slip == "scaled dv" else 1.0) * p.T @ do[rows]


def check_dkdv_step(dkdv_step) -> None:
    """dkdv_step(q, do, lse, delta, k, v, visible, dk, dv, scale) -> (dk, dv): a @triton.jit function adding one
    query tile's share to one key tile's gradients (q, do [BM, BD]; lse, delta [BM]; k, v [BN, BD]; visible
    bool [BM, BN]; dk, dv [BN, BD] float32). Run by teaching.block_grads on a block seen by its own queries
    (causally) and by routed later queries; compared with autograd in float64."""
    from ..kernels import INTERPRET, teaching

    dev, S, D, W, key0, scale = sandbox.device(), 48, 8, 12, 12, 0.4
    gen = torch.Generator().manual_seed(71)
    q, k = (torch.randint(-16, 17, (n, D), generator=gen).double() / 8 for n in (S, W))   # exact in TF32
    do, v = (torch.randn(n, D, generator=gen, dtype=torch.float64) for n in (S, W))
    later = torch.arange(key0 + W, S)
    rows = torch.cat([torch.arange(key0, key0 + W), later[torch.rand(len(later), generator=gen) < 0.5]])
    lse, delta, dk_right, dv_right = _tile_grads(q, do, rows, k, v, key0, scale, seed=72)
    (dk, check_dk), (dv, check_dv) = (sandbox.guarded((W, D), torch.float32, dev) for _ in range(2))
    sandbox.run(lambda: teaching.block_grads(*(x.to(dev) for x in (q, do, lse, delta, rows, k, v)), key0, scale,
                                             step=dkdv_step, dk=dk, dv=dv), {}, "dkdv_step")
    for check in (check_dk, check_dv):
        check("dkdv_step wrote outside dk / dv: return (dk, dv), the kernel stores them")
    answer = (dk.cpu(), dv.cpu())
    tol = 1e-4 if INTERPRET else 5e-3

    def same(a, b):
        return all(bool(torch.isfinite(x).all()) and float((x.double() - y).norm()) <= tol * float(y.norm())
                   for x, y in zip(a, b))

    slipped = lambda slip: _tile_slipped(q, do, lse, delta, rows, k, v, key0, scale, slip)  # noqa: E731
    expect(all(bool(torch.isfinite(x).all()) for x in answer), "NaN or inf in dk or dv: P = exp(s - lse) must be "
           "zeroed where not visible (tl.where(visible, ..., 0.0)); masked scores must not reach exp unmasked")
    judge(answer, (dk_right, dv_right), {
        "dS = P * dP: subtract each row's Delta, dS = P * (dP - delta[:, None])": slipped("no delta"),
        "forgot the scale in dK: dk += scale * dot(trans(dS), q)": slipped("unscaled dk"),
        "scaled dV: the scale multiplies the scores, not the probabilities: dv += dot(trans(P), do)": slipped("scaled dv"),
        "P = exp(s) is unnormalised: recompute P = exp(s - lse[:, None])": slipped("no lse"),
        "P was not masked: keys after a query (own block) and padding rows must get P = 0, tl.where(visible, P, 0.0)":
            slipped("unmasked"),
    }, same, "dk or dv differ from autograd: P = exp(scale q k^T - lse) where visible (0 elsewhere), dv += P^T dO, "
       "dS = P (dO v^T - delta), dk += scale dS^T q")
    passed("dkdv_step: the block's dK and dV match autograd in float64 (own-block queries causally, routed ones whole)")
