"""The exercise checks of notebook 07 accept the right answer and name each planted mistake."""

import pytest
import torch

from moba_edu.checks import Mistake, nb07


def attention_backward(q, k, v, o, lse, do, mask, scale, slip=None):
    s = scale * q @ k.T
    p = torch.exp(s - (0 if slip == "unnormalised" else lse[:, None]))
    if slip != "unmasked":
        p = p.masked_fill(~mask, 0.0)
    dp = do @ v.T
    delta = dp.sum(1) if slip == "delta_dp" else (do * o).sum(1)
    ds = p * dp if slip == "no_delta" else p * (dp - delta[:, None])
    factor = 1.0 if slip == "no_scale" else scale
    dv = p.T @ do * (scale if slip == "scaled_dv" else 1.0)
    if slip == "untransposed":
        return factor * ds @ k, factor * ds @ k, dv
    return factor * ds @ k, factor * ds.T @ q, dv


def block_grads(q, do, lse, delta, chose, k, v, scale, slip=None):
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for h in range(1 if slip == "one_head" else q.shape[0]):
        rows = torch.ones_like(chose[h]) if slip == "everyone" else chose[h]
        p = torch.exp(scale * q[h, rows] @ k.T - lse[h, rows, None])
        ds = p * (do[h, rows] @ v.T - (0 if slip == "no_delta" else delta[h, rows, None]))
        dv += p.T @ do[h, rows]
        dk += (1.0 if slip == "no_scale" else scale) * ds.T @ q[h, rows]
    return dk, dv


def test_attention_backward_accepts_the_right_answer(capsys):
    nb07.check_attention_backward(attention_backward)
    assert capsys.readouterr().out.startswith("✓")


@pytest.mark.parametrize("slip, message", [
    ("no_delta", "dS = P \\* dP"), ("delta_dp", "Delta = rowsum\\(dP\\)"), ("no_scale", "forgot the scale in dQ"),
    ("scaled_dv", "scaled dV"), ("unnormalised", "unnormalised"), ("unmasked", "masked keys got probability"),
    ("untransposed", "transpose the \\[M, N\\] tile"),
])
def test_attention_backward_names_the_mistake(slip, message):
    with pytest.raises(Mistake, match=message):
        nb07.check_attention_backward(lambda *args: attention_backward(*args, slip=slip))


def test_block_grads_accepts_the_right_answer(capsys):
    nb07.check_block_grads(block_grads)
    assert capsys.readouterr().out.startswith("✓")


@pytest.mark.parametrize("slip, message", [
    ("one_head", "only the first query head"), ("everyone", "used every query"),
    ("no_scale", "forgot the scale in dK"), ("no_delta", "dS without Delta"),
])
def test_block_grads_names_the_mistake(slip, message):
    with pytest.raises(Mistake, match=message):
        nb07.check_block_grads(lambda *args: block_grads(*args, slip=slip))


def test_attention_backward_forbids_softmax():
    def with_softmax(q, k, v, o, lse, do, mask, scale):
        p = torch.softmax((scale * q @ k.T).masked_fill(~mask, float("-inf")), dim=1)
        return attention_backward(q, k, v, o, lse, do, mask, scale)[0], p.T @ do, p.T @ do
    with pytest.raises(Mistake, match="you called torch.softmax"):
        nb07.check_attention_backward(with_softmax)


# --- the Triton dK/dV step: the library's version passes, planted slips are named ---

from moba_edu.kernels import INTERPRET  # noqa: E402,F401 (sets TRITON_INTERPRET=1 without CUDA first)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from moba_edu.kernels import teaching  # noqa: E402


@triton.jit
def step_slipped(q, do, lse, delta, k, v, visible, dk, dv, scale, SLIP: tl.constexpr):
    s = tl.dot(q, tl.trans(k)) * scale
    if SLIP == "no lse":
        p = tl.where(visible, tl.exp(s), 0.0)
    elif SLIP == "unmasked":
        p = tl.exp(s - lse[:, None])
    else:
        p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v))
    if SLIP == "no delta":
        ds = p * dp
    else:
        ds = p * (dp - delta[:, None])
    if SLIP == "unscaled dk":
        return dk + tl.dot(tl.trans(ds), q), dv + tl.dot(tl.trans(p), do)
    return dk + scale * tl.dot(tl.trans(ds), q), dv + tl.dot(tl.trans(p), do)


@triton.jit
def step_no_delta(q, do, lse, delta, k, v, visible, dk, dv, scale):
    return step_slipped(q, do, lse, delta, k, v, visible, dk, dv, scale, "no delta")


@triton.jit
def step_unscaled_dk(q, do, lse, delta, k, v, visible, dk, dv, scale):
    return step_slipped(q, do, lse, delta, k, v, visible, dk, dv, scale, "unscaled dk")


@triton.jit
def step_no_lse(q, do, lse, delta, k, v, visible, dk, dv, scale):
    return step_slipped(q, do, lse, delta, k, v, visible, dk, dv, scale, "no lse")


@triton.jit
def step_unmasked(q, do, lse, delta, k, v, visible, dk, dv, scale):
    return step_slipped(q, do, lse, delta, k, v, visible, dk, dv, scale, "unmasked")


STEPS = {"no delta": step_no_delta, "unscaled dk": step_unscaled_dk, "no lse": step_no_lse, "unmasked": step_unmasked}


def test_dkdv_step_accepts_the_library_step(capsys):
    nb07.check_dkdv_step(teaching.dkdv_step)
    assert capsys.readouterr().out.startswith("✓")


@pytest.mark.parametrize("slip, message", [
    ("no delta", "subtract each row's Delta"), ("unscaled dk", "forgot the scale in dK"),
    ("no lse", "unnormalised"), ("unmasked", "P was not masked"),
])
def test_dkdv_step_names_the_mistake(slip, message):
    with pytest.raises(Mistake, match=message):
        nb07.check_dkdv_step(STEPS[slip])
