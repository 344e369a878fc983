"""The exercise checks of notebook 09 accept the right answers and name each planted mistake."""

import pytest
import torch

from moba_edu.checks import Mistake, nb09


def route_token(q_t, means, t, block_size, top_k, slip=None):
    """Routing one token from the cached means, with one named slip or none."""
    own = t // block_size
    n_eligible = {"own eligible": own + 1, "one short": max(own - 1, 0)}.get(slip, own)
    gates = means[:n_eligible] @ q_t
    n = min(top_k if slip == "top_k" else top_k - 1, gates.numel())
    return gates.topk(n, largest=slip != "smallest").indices


def merge_splits(o, lse, slip=None):
    """The log-sum-exp merge of split partials, with one named slip or none."""
    if slip == "average":
        return o.mean(0), torch.logsumexp(lse, 0)
    m = lse.max() if slip != "no max" else torch.tensor(0.0)
    w = torch.exp(lse - m)
    if slip != "nan":
        o = torch.where(w[:, None] > 0, o, 0.0)
    lse_out = m + torch.log(w.sum()) if slip != "max lse" else lse.max()
    return (w[:, None] * o).sum(0) / w.sum(), lse_out


def test_route_token_accepts_the_right_routing(capsys):
    nb09.check_route_token(route_token)
    assert capsys.readouterr().out.startswith("✓")


@pytest.mark.parametrize("slip, message", [
    ("own eligible", "the own block is not eligible"),
    ("top_k", "top_k counts the own block"),
    ("smallest", "the smallest gates"),
    ("one short", "the block just before the own block"),
])
def test_route_token_names_the_mistake(slip, message):
    with pytest.raises(Mistake, match=message):
        nb09.check_route_token(lambda *args: route_token(*args, slip=slip))


def test_route_token_rejects_a_float_answer():
    with pytest.raises(Mistake, match="integers"):
        nb09.check_route_token(lambda q_t, means, *rest: means @ q_t)


def test_merge_splits_accepts_the_right_merge(capsys):
    nb09.check_merge_splits(merge_splits)
    assert capsys.readouterr().out.startswith("✓")


@pytest.mark.parametrize("slip, message", [
    ("average", "you averaged the splits"),
    ("max lse", "lse is the max"),
    ("no max", "subtract the largest lse"),
    ("nan", "NaN from an empty split"),
])
def test_merge_splits_names_the_mistake(slip, message):
    with pytest.raises(Mistake, match=message):
        nb09.check_merge_splits(lambda o, lse: merge_splits(o, lse, slip=slip))
