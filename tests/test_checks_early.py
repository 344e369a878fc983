"""Notebooks 00-02's helpers: the exercise checks accept the right answer and name each planted
mistake; the environment report imports nothing heavy."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moba_edu import routing
from moba_edu.checks import Mistake, nb00, nb01, nb02


def causal_fraction(S, block_size, top_k):
    """Right answer, counted per query: own block up to t, plus min(top_k - 1, b) full past blocks."""
    kept = sum(t % block_size + 1 + min(top_k - 1, t // block_size) * block_size for t in range(S))
    return kept / (S * (S + 1) / 2)


def attention(q, k, v, keep=lambda t, s: s <= t, scale=None, mask_after=False, fill=float("-inf")):
    """Causal attention of q, k, v [S, D] with one slip or none: `keep(t, s)` says which keys survive."""
    S, D = q.shape
    t, s = torch.arange(S)[:, None], torch.arange(S)[None, :]
    scores = q @ k.T * (1 / math.sqrt(D) if scale is None else scale)
    if mask_after:
        return scores.softmax(-1) * keep(t, s) @ v
    return scores.masked_fill(~keep(t, s), fill).softmax(-1) @ v


def hand_lse(x, keepdim=False):
    """log(sum(exp(x))) over the last dim, written out (the check forbids torch.logsumexp)."""
    m = x.max(-1, keepdim=True).values
    out = m + torch.log(torch.exp(x - m).sum(-1, keepdim=True))
    return out if keepdim else out.squeeze(-1)


def unstable_attention(q, k, v):
    S, D = q.shape
    w = torch.exp(q @ k.T / math.sqrt(D)) * torch.ones(S, S).tril()
    return w / w.sum(-1, keepdim=True) @ v


def means(k, block_size):
    return routing.block_means(k[None, None], block_size)[0, 0]


def padded_means(k, block_size):
    S, D = k.shape
    N = routing.num_blocks(S, block_size)
    return F.pad(k.float(), (0, 0, 0, N * block_size - S)).view(N, block_size, D).mean(1)


def tail_by_remainder(k, block_size):
    """Divides the last block by S % block_size, which is 0 when block_size divides S."""
    S, D = k.shape
    N = routing.num_blocks(S, block_size)
    sums = F.pad(k.float(), (0, 0, 0, N * block_size - S)).view(N, block_size, D).sum(1)
    counts = torch.tensor([block_size] * (N - 1) + [S % block_size], dtype=torch.float32)
    return sums / counts[:, None]


def eligibility(rule):
    def fn(S, block_size):
        t, j = torch.arange(S)[:, None], torch.arange(routing.num_blocks(S, block_size))[None, :]
        return rule(t, j, block_size)
    return fn


def select(gates, block_size, top_k, routed=lambda top_k: top_k - 1, largest=True, own=True, drop_inf=True):
    """Block mask from gates [S, N] with the planted slips as switches."""
    S, N = gates.shape
    mask = torch.zeros(S, N, dtype=torch.bool)
    if own:
        mask[torch.arange(S), torch.arange(S) // block_size] = True
    n = min(routed(top_k), N)
    if n > 0:
        ranked = gates if largest else torch.where(gates > float("-inf"), -gates, float("-inf"))
        idx = ranked.topk(n, dim=-1).indices
        picked = torch.zeros_like(mask).scatter_(-1, idx, True)
        if drop_inf:
            picked &= gates > float("-inf")
        mask |= picked
    return mask


def unclamped_top_k(gates, block_size, top_k):
    """Right until top_k - 1 exceeds the number of blocks: then torch.topk raises."""
    gates.topk(top_k - 1, dim=-1)
    return select(gates, block_size, top_k)


ACCEPTED = [
    (nb00.check_num_blocks, routing.num_blocks),
    (nb00.check_num_blocks, lambda S, b: math.ceil(S / b)),
    (nb00.check_causal_fraction, causal_fraction),
    (nb01.check_causal_attention, attention),
    (nb01.check_causal_attention, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
    (nb01.check_logsumexp, hand_lse),
    (nb02.check_block_means, means),
    (nb02.check_block_scores, lambda q, m: q.float() @ m.T),
    (nb02.check_eligible, lambda S, b: routing.eligible(S, b)),
    (nb02.check_eligible, eligibility(lambda t, j, b: (j + 1) * b <= t)),  # "ends before t" is the same rule
    (nb02.check_select_blocks, select),
    (nb02.check_select_blocks,
     lambda g, b, k: routing.indices_to_mask(routing.select_blocks(g, b, k), g.shape[1])),
]


@pytest.mark.parametrize("check", sorted({check for check, _ in ACCEPTED}, key=lambda c: c.__qualname__))
def test_check_lets_an_unanswered_exercise_say_so(check):
    def unanswered(*args):
        raise NotImplementedError()  # what nbgrader leaves in the student version
    with pytest.raises(NotImplementedError):
        check(unanswered)


@pytest.mark.parametrize("check, fn", ACCEPTED)
def test_check_accepts_the_right_answer(check, fn, capsys):
    check(fn)
    assert capsys.readouterr().out.startswith("✓")


MISTAKES = [
    (nb00.check_num_blocks, lambda S, b: S // b, "rounded down"),
    (nb00.check_num_blocks, lambda S, b: S // b + 1, "one block too many"),
    (nb00.check_num_blocks, lambda S, b: S / b, "return an int"),
    (nb00.check_causal_fraction, lambda S, b, k: causal_fraction(S, b, k) * S * (S + 1) / 2, "returned a count"),
    (nb00.check_causal_fraction, lambda S, b, k: causal_fraction(S, b, k) * (S + 1) / (2 * S), "divided by S²"),
    (nb00.check_causal_fraction, lambda S, b, k: sum(t % b + 1 + min(k, t // b) * b for t in range(S)) / (S * (S + 1) / 2),
     "top_k counts the own block"),
    (nb00.check_causal_fraction, lambda S, b, k: sum(min(b, S - t // b * b) + min(k - 1, t // b) * b
                                                     for t in range(S)) / (S * (S + 1) / 2), "attended causally"),
    (nb00.check_causal_fraction, lambda S, b, k: sum(t % b + 1 + (k - 1) * b for t in range(S)) / (S * (S + 1) / 2),
     "only b blocks in its past"),
    (nb01.check_causal_attention, lambda q, k, v: attention(q, k, v, mask_after=True), "mask was applied after"),
    (nb01.check_causal_attention, lambda q, k, v: attention(q, k, v, scale=1.0), "forgot the 1/sqrt"),
    (nb01.check_causal_attention, lambda q, k, v: attention(q, k, v, scale=1 / q.shape[1]), "scaled by 1/d"),
    (nb01.check_causal_attention, lambda q, k, v: attention(q, k, v, keep=lambda t, s: s < t), "masked the diagonal"),
    (nb01.check_causal_attention, lambda q, k, v: attention(q, k, v, keep=lambda t, s: s < t, fill=-1e9),
     "masked the diagonal"),
    (nb01.check_causal_attention, lambda q, k, v: attention(q, k, v, keep=lambda t, s: s <= t + 1), "future key leaks"),
    (nb01.check_causal_attention, lambda q, k, v: attention(q, k, v, keep=lambda t, s: s >= t), "flipped"),
    (nb01.check_causal_attention, lambda q, k, v: attention(q, k, v, keep=lambda t, s: s >= 0), "no causal mask"),
    (nb01.check_causal_attention, lambda q, k, v: (q @ k.T).softmax(-1), "attention weights"),
    (nb01.check_causal_attention, unstable_attention, "overflowed"),
    (nb01.check_logsumexp, lambda x: hand_lse(x) - math.log(x.shape[-1]), "averaged"),
    (nb01.check_logsumexp, lambda x: x.max(-1).values, "only the maximum"),
    (nb01.check_logsumexp, lambda x: torch.log(torch.exp(x - x.max(-1, keepdim=True).values).sum(-1)),
     "did not add it back"),
    (nb01.check_logsumexp, lambda x: torch.log(torch.exp(x).sum(-1)), "overflowed"),
    (nb01.check_logsumexp, lambda x: hand_lse(x, keepdim=True), "drop the kept dimension"),
    (nb01.check_logsumexp, lambda x: torch.logsumexp(x, -1), "you called torch.logsumexp"),
    (nb01.check_logsumexp, lambda x: x.logsumexp(-1), "you called torch.Tensor.logsumexp"),
    (nb01.check_logsumexp, lambda x: (x - F.log_softmax(x, -1))[..., 0], "you called torch.nn.functional.log_softmax"),
    (nb01.check_logsumexp, lambda x: hand_lse(x.nan_to_num(neginf=0.0)), "-inf"),
    (nb02.check_block_means, padded_means, "padded tail mean"),
    (nb02.check_block_means, lambda k, b: means(k, b)[: k.shape[0] // b], "short last block is missing"),
    (nb02.check_block_means, lambda k, b: means(k, b) * torch.tensor(
        [min(b, k.shape[0] - j * b) for j in range(routing.num_blocks(k.shape[0], b))])[:, None], "summed"),
    (nb02.check_block_means, lambda k, b: means(k, b).to(k.dtype).float(), "rounded to the input dtype"),
    (nb02.check_block_means, lambda k, b: means(k, b).to(k.dtype), "float32"),
    (nb02.check_block_means, tail_by_remainder, "S % block_size is 0"),
    (nb02.check_block_scores, lambda q, m: q.float() @ m.T / math.sqrt(q.shape[1]), "a scaled score"),
    (nb02.check_block_scores, lambda q, m: (q @ m.to(q.dtype).T).float(), "input dtype"),
    (nb02.check_block_scores, lambda q, m: m @ q.float().T, "transposed"),
    (nb02.check_eligible, eligibility(lambda t, j, b: j <= t // b), "own block was treated as eligible"),
    (nb02.check_eligible, eligibility(lambda t, j, b: j * b < t), "first token"),
    (nb02.check_eligible, eligibility(lambda t, j, b: j < t), "block index j with token index t"),
    (nb02.check_eligible, lambda S, b: routing.eligible(S, b).T, "transposed"),
    (nb02.check_eligible, lambda S, b: routing.eligible(S, b).int(), "torch.bool"),
    (nb02.check_select_blocks, lambda g, b, k: select(g, b, k, routed=lambda k: k), "did not count the own block"),
    (nb02.check_select_blocks, lambda g, b, k: select(g, b, k, own=False, routed=lambda k: k), "own block is missing"),
    (nb02.check_select_blocks, lambda g, b, k: select(g, b, k, drop_inf=False), "gate -inf"),
    (nb02.check_select_blocks, lambda g, b, k: select(g, b, k, largest=False), "smallest gates"),
    (nb02.check_select_blocks, lambda g, b, k: select(g, b, k, routed=lambda k: k + 10), "wrong blocks for top_k=3"),
    (nb02.check_select_blocks, unclamped_top_k, "failed for top_k=7"),
]


@pytest.mark.parametrize("check, fn, named", MISTAKES)
def test_check_names_the_mistake(check, fn, named):
    with pytest.raises(Mistake, match=named.replace("(", r"\(").replace(".", r"\.")):
        check(fn)


def test_environment_report_imports_neither_triton_nor_views():
    # importing triton here would fix its mode before moba_edu.kernels sets TRITON_INTERPRET
    code = ("import sys, torch; from moba_edu.environment import describe; report = describe(); "
            "assert 'torch ' + torch.__version__ in report, report; "
            "print(sorted({'triton', 'matplotlib', 'ipywidgets'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_failed_check_shows_one_line_in_jupyter():
    """IPython renders a Mistake by its `_render_traceback_`: the stored error is the message alone,
    without the check's source (executed in a real kernel, as a notebook would)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import torch\nfrom moba_edu.checks import nb01\nnb01.check_logsumexp(lambda x: x.max(-1).values)")])
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True).execute()
    (error,) = [o for o in nb.cells[0].outputs if o.output_type == "error"]
    assert error.ename == "Mistake" and error.traceback == [f"✗ {error.evalue}"]
    assert error.evalue.startswith("returned only the maximum")
