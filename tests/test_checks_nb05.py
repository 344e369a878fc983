"""The exercise checks of notebook 05 accept the right answer and name each planted mistake."""

import pytest
import torch

from moba_edu.checks import Mistake, nb05
from moba_edu.kernels import INTERPRET  # (sets TRITON_INTERPRET=1 without CUDA before triton loads)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def update(m, l, acc, s, v, slip=None):
    """The online-softmax step, with one named slip or none."""
    m_new = torch.maximum(m, s.max(dim=1).values)
    alpha = torch.exp(m) / torch.exp(m_new) if slip == "ratio" else torch.exp(m - m_new)
    p = torch.exp(s - m_new[:, None])
    l_new = (l if slip == "sum" else l * alpha) + p.sum(1)
    acc_new = (acc if slip == "acc" else acc * alpha[:, None]) + p @ v
    return m_new, l_new, acc_new


def test_attention_update_accepts_the_right_step(capsys):
    nb05.check_attention_update(update)
    assert capsys.readouterr().out.startswith("✓")


@pytest.mark.parametrize("slip, message", [
    ("sum", "forgot to rescale the running sum l by exp(m_old - m_new)"),
    ("acc", "forgot to rescale the accumulator"),
    ("ratio", "NaN or inf"),
])
def test_attention_update_names_the_mistake(slip, message):
    with pytest.raises(Mistake, match=message.replace("(", r"\(").replace(")", r"\)")):
        nb05.check_attention_update(lambda *args: update(*args, slip=slip))


@triton.jit
def tile_max(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n, other=-float("inf"))
    tl.store(out_ptr + pid, tl.max(x, axis=0))


@triton.jit
def tile_max_unmasked(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + pid, tl.max(tl.load(x_ptr + offsets), axis=0))


@triton.jit
def tile_max_zero_padding(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + pid, tl.max(tl.load(x_ptr + offsets, mask=offsets < n, other=0.0), axis=0))


@triton.jit
def tile_max_first_tile(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n, other=-float("inf"))
    tl.store(out_ptr + pid, tl.max(x, axis=0))


@triton.jit
def tile_max_stored_per_lane(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n, other=-float("inf"))
    tl.store(out_ptr + offsets, tl.zeros_like(x) + tl.max(x, axis=0))   # BLOCK values per program


@triton.jit
def tile_max_far_store(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n, other=-float("inf"))
    tl.store(out_ptr + pid * 100_000_000, tl.max(x, axis=0))   # far outside: would crash the interpreter


@triton.jit
def tile_max_not_written(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    raise NotImplementedError()


def test_tile_max_accepts_the_right_kernel(capsys):
    nb05.check_tile_max(tile_max)
    assert capsys.readouterr().out.startswith("✓")


@pytest.mark.parametrize("kernel, message", [
    (tile_max_unmasked, "mask missing: the last program loaded x past n"),
    (tile_max_stored_per_lane, "you stored at out_ptr \\+ offsets"),
    (tile_max_zero_padding, "masked lanes were filled with 0"),
    (tile_max_first_tile, "every program read the first tile"),
])
def test_tile_max_names_the_mistake(kernel, message):
    with pytest.raises(Mistake, match=message):
        nb05.check_tile_max(kernel)


@pytest.mark.skipif(not INTERPRET, reason="on a GPU a store this far is an illegal address, not a named mistake")
def test_tile_max_names_a_far_store_without_crashing():
    with pytest.raises(Mistake, match="you stored at out_ptr"):
        nb05.check_tile_max(tile_max_far_store)


def test_tile_max_passes_on_not_implemented():
    """The student version's stub surfaces as NotImplementedError, not the interpreter's wrapper."""
    with pytest.raises(NotImplementedError):
        nb05.check_tile_max(tile_max_not_written)
