"""Corner identities of MoBA (docs/design.md §1), checked against independent computations."""

import torch
from hypothesis import given

import moba_edu as me
from reference import dense_causal
from strategies import cases


@given(case=cases())
def test_top_k_beyond_blocks_is_full_causal_attention(case):
    q, k, v = case.tensors(torch.float64)
    o = me.moba_attention(q, k, v, block_size=case.block_size, top_k=case.n_blocks + 1, impl="naive")
    torch.testing.assert_close(o, dense_causal(q, k, v))


@given(case=cases())
def test_top_k_one_is_block_local_causal_attention(case):
    q, k, v = case.tensors(torch.float64)
    o = me.moba_attention(q, k, v, block_size=case.block_size, top_k=1, impl="naive")
    g = case.Hq // case.Hkv
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    for start in range(0, case.S, case.block_size):  # each block on its own is ordinary causal attention
        s = slice(start, start + case.block_size)
        torch.testing.assert_close(o[:, :, s], torch.nn.functional.scaled_dot_product_attention(
            q[:, :, s], k[:, :, s], v[:, :, s], is_causal=True))


@given(case=cases())
def test_grouped_heads_equal_repeated_keys(case):
    q, k, v = case.tensors(torch.float64)
    g = case.Hq // case.Hkv
    o = me.moba_attention(q, k, v, block_size=case.block_size, top_k=case.top_k, impl="naive")
    o_rep = me.moba_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                              block_size=case.block_size, top_k=case.top_k, impl="naive")
    torch.testing.assert_close(o, o_rep)


def test_packed_equals_separate_sequences():
    gen = torch.Generator().manual_seed(4)
    lengths = [7, 0, 1, 20]
    seqs = [torch.randn(3, n, 2, 8, generator=gen) for n in lengths]  # (q, k, v) stacked, [3, S, H, D]
    packed = torch.cat(seqs, dim=1)
    cu = torch.tensor([0, 7, 7, 8, 28], dtype=torch.int64)
    o = me.moba_attention_varlen(*packed, cu, 20, block_size=4, top_k=2, impl="naive")
    for seq, start, end in zip(seqs, cu[:-1].tolist(), cu[1:].tolist()):
        alone = me.moba_attention(*(t.transpose(0, 1)[None] for t in seq), block_size=4, top_k=2, impl="naive")
        torch.testing.assert_close(o[start:end], alone[0].transpose(0, 1))


def test_official_alias():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(30, 2, 8, generator=gen) for _ in range(3))
    cu = torch.tensor([0, 12, 30], dtype=torch.int32)
    torch.testing.assert_close(me.moba_attn_varlen(q, k, v, cu, 18, 4, 3),
                               me.moba_attention_varlen(q, k, v, cu, 18, block_size=4, top_k=3))


def test_scale_argument():
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 1, 16, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    # scaling q by c with scale 1 equals scale c; the routing ignores the scale but not q's norm, so
    # compare at top_k >= N where routing cannot change
    o = me.moba_attention(q, k, v, block_size=4, top_k=4, scale=0.3, impl="naive")
    torch.testing.assert_close(o, dense_causal(q, k, v, scale=0.3))
