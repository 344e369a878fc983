"""Hypothesis strategies shared by every rung's property tests: the space docs/design.md asks every
implementation to cover (odd lengths, short tails, top_k of 1 and beyond N, grouped heads, packed
batches with empty and length-1 sequences)."""

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

LARGE_HEAD_DIMS = (160, 192, 200, 256)
"""Head dims past 128, where the Triton kernels take smaller tiles on a GPU; 160 and 200 run padded to 256."""


@dataclass
class Case:
    B: int
    Hq: int
    Hkv: int
    S: int
    D: int
    block_size: int
    top_k: int
    seed: int

    @property
    def n_blocks(self):
        return -(-self.S // self.block_size)

    def tensors(self, dtype=torch.float32, device="cpu", requires_grad=False):
        gen = torch.Generator().manual_seed(self.seed)
        make = lambda h: torch.randn(self.B, h, self.S, self.D, generator=gen, dtype=torch.float64)  # noqa: E731
        q, k, v = make(self.Hq), make(self.Hkv), make(self.Hkv)
        return tuple(t.to(device, dtype).requires_grad_(requires_grad) for t in (q, k, v))


@st.composite
def cases(draw, max_s=48, head_dims=(4, 8, 16), max_batch=2):
    """Batched [B,H,S,D] cases; top_k from 1 to past the number of blocks."""
    Hkv = draw(st.integers(1, 2))
    g = draw(st.sampled_from([1, 2]))
    S = draw(st.integers(1, max_s))
    block_size = draw(st.integers(1, max(1, S)) | st.sampled_from([4, 8, 16]))
    n_blocks = -(-S // block_size)
    top_k = draw(st.sampled_from([1, 2, 3]) | st.integers(1, n_blocks + 2))
    return Case(B=draw(st.integers(1, max_batch)), Hq=g * Hkv, Hkv=Hkv, S=S, D=draw(st.sampled_from(head_dims)),
                block_size=block_size, top_k=top_k, seed=draw(st.integers(0, 2**31 - 1)))


@dataclass
class VarlenCase:
    lengths: list
    Hq: int
    Hkv: int
    D: int
    block_size: int
    top_k: int
    seed: int

    @property
    def cu_seqlens(self):
        return torch.tensor([0] + self.lengths, dtype=torch.int32).cumsum(0).to(torch.int32)

    @property
    def max_seqlen(self):
        return max(self.lengths, default=0)

    def tensors(self, dtype=torch.float32, device="cpu", requires_grad=False):
        gen = torch.Generator().manual_seed(self.seed)
        T = sum(self.lengths)
        make = lambda h: torch.randn(T, h, self.D, generator=gen, dtype=torch.float64)  # noqa: E731
        q, k, v = make(self.Hq), make(self.Hkv), make(self.Hkv)
        return tuple(t.to(device, dtype).requires_grad_(requires_grad) for t in (q, k, v))


@st.composite
def varlen_cases(draw, max_len=40, max_seqs=4, head_dims=(4, 8, 16)):
    """Packed batches: lengths include 0 and 1; blocks restart at each sequence."""
    lengths = draw(st.lists(st.integers(0, max_len) | st.sampled_from([0, 1]), min_size=1, max_size=max_seqs))
    Hkv = draw(st.integers(1, 2))
    g = draw(st.sampled_from([1, 2]))
    block_size = draw(st.integers(1, 12) | st.sampled_from([4, 8, 16]))
    top_k = draw(st.integers(1, 5))
    return VarlenCase(lengths=lengths, Hq=g * Hkv, Hkv=Hkv, D=draw(st.sampled_from(head_dims)),
                      block_size=block_size, top_k=top_k, seed=draw(st.integers(0, 2**31 - 1)))


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64 (0 for two empty tensors)."""
    ref = ref.double()
    if ref.numel() == 0:
        return 0.0
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
