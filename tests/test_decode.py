"""MoBA decoding (moba_edu/decode.py, kernels/decode.py; docs/design.md §2a): a prefill of random
length then decoding in chunks of random size (s = 1 and s > 1), per sequence of a ragged batch,
reproduces the float64 reference over the whole sequence, on every rung (triton under the interpreter,
tiny shapes). Also the cache's pages and means, and the named errors."""

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moba_edu as me
from moba_edu.decode import MobaKVCache, moba_decode
from moba_edu.routing import block_means
from reference import reference_moba

FEW = settings(max_examples=8)


@dataclass
class DecodeCase:
    lengths: list   # final tokens per sequence
    prefill: list   # prompt tokens per sequence (0 allowed)
    chunks: list    # tokens per sequence at each later step, cycled (a shorter remainder is ragged)
    Hq: int
    Hkv: int
    D: int
    block_size: int
    top_k: int
    seed: int

    def tensors(self, dtype=torch.float32):
        """q [B, Hq, L, D], k, v [B, Hkv, L, D], L the longest length (rows past a length are unused)."""
        gen = torch.Generator().manual_seed(self.seed)
        B, L = len(self.lengths), max(self.lengths)
        make = lambda h: torch.randn(B, h, L, self.D, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
        return make(self.Hq), make(self.Hkv), make(self.Hkv)


@st.composite
def decode_cases(draw, max_len=24, max_batch=3):
    lengths = draw(st.lists(st.integers(1, max_len), min_size=1, max_size=max_batch))
    prefill = [draw(st.integers(0, n) | st.sampled_from([0, n])) for n in lengths]
    Hkv = draw(st.integers(1, 2))
    block_size = draw(st.integers(1, 8) | st.sampled_from([4, 8]))
    n_blocks = -(-max(lengths) // block_size)
    return DecodeCase(lengths=lengths, prefill=prefill,
                      chunks=draw(st.lists(st.sampled_from([1, 1, 2, 3]), min_size=1, max_size=4)),
                      Hq=draw(st.sampled_from([1, 2])) * Hkv, Hkv=Hkv, D=draw(st.sampled_from([4, 8, 16])),
                      block_size=block_size, top_k=draw(st.sampled_from([1, 2, 3]) | st.integers(1, n_blocks + 2)),
                      seed=draw(st.integers(0, 2**31 - 1)))


def rows(x, start, counts, width):
    """x [B, H, L, D] -> [B, H, width, D]: rows start[b] .. start[b] + counts[b] - 1 of each sequence, zeros after."""
    out = x.new_zeros(x.shape[0], x.shape[1], width, x.shape[3])
    for b, (s, n) in enumerate(zip(start, counts)):
        out[b, :, :n] = x[b, :, s:s + n]
    return out


def prefill_and_decode(case, impl, dtype=torch.float32):
    """Prefill then chunked decoding; returns o [B, Hq, L, D] and lse [B, Hq, L] assembled per token."""
    q, k, v = case.tensors(dtype)
    B, L = len(case.lengths), max(case.lengths)
    cache = MobaKVCache(B, case.Hkv, case.D, block_size=case.block_size, max_seqlen=L, dtype=dtype)
    o = torch.full((B, case.Hq, L, case.D), float("nan"), dtype=torch.float64)
    lse = torch.full((B, case.Hq, L), float("nan"), dtype=torch.float64)
    done, counts, step = [0] * B, list(case.prefill), 0
    while True:
        width = max(counts)
        if width:
            cache.append(rows(k, done, counts, width), rows(v, done, counts, width), lengths=counts)
            o_s, lse_s = moba_decode(rows(q, done, counts, width), cache, top_k=case.top_k, impl=impl,
                                     lengths=counts, return_lse=True)
            for b, n in enumerate(counts):
                o[b, :, done[b]:done[b] + n], lse[b, :, done[b]:done[b] + n] = o_s[b, :, :n], lse_s[b, :, :n]
                assert (o_s[b, :, n:] == 0).all() and (lse_s[b, :, n:] == float("-inf")).all(), "padding rows"
        done = [d + n for d, n in zip(done, counts)]
        if done == case.lengths:
            assert cache.seqlens.tolist() == case.lengths
            return o, lse
        chunk = case.chunks[step % len(case.chunks)]
        counts, step = [min(chunk, n - d) for n, d in zip(case.lengths, done)], step + 1


def assert_matches_reference(case, o, lse, atol):
    q, k, v = case.tensors(torch.float64)
    for b, n in enumerate(case.lengths):
        o_ref, lse_ref = reference_moba(q[b:b + 1, :, :n], k[b:b + 1, :, :n], v[b:b + 1, :, :n],
                                        case.block_size, case.top_k)
        torch.testing.assert_close(o[b, :, :n], o_ref[0], atol=atol, rtol=atol)
        torch.testing.assert_close(lse[b, :, :n], lse_ref[0], atol=atol, rtol=atol)


@FEW
@given(case=decode_cases())
@pytest.mark.parametrize("impl", ["naive", "torch", "triton"])
def test_prefill_and_decode_match_the_full_forward(impl, case):
    o, lse = prefill_and_decode(case, impl)
    assert_matches_reference(case, o, lse, atol=1e-5)


@FEW
@given(case=decode_cases(max_len=16, max_batch=2))
@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_float64_decode_is_the_reference(impl, case):
    o, lse = prefill_and_decode(case, impl, torch.float64)
    assert_matches_reference(case, o, lse, atol=1e-10)


def test_decode_equals_moba_attention_rows():
    """Token by token after a prompt, every row equals moba_attention over the whole sequence."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 40, 16, generator=gen) for h in (4, 2, 2))
    full = me.moba_attention(q, k, v, block_size=8, top_k=3, impl="torch")
    cache = MobaKVCache(2, 2, 16, block_size=8, max_seqlen=40, dtype=torch.float32)
    cache.append(k[:, :, :17], v[:, :, :17])
    outs = [moba_decode(q[:, :, :17], cache, top_k=3)]
    for t in range(17, 40):
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        outs.append(moba_decode(q[:, :, t:t + 1], cache, top_k=3))
    torch.testing.assert_close(torch.cat(outs, dim=2), full, atol=1e-5, rtol=1e-5)


def test_pages_and_means():
    """Pages are handed out in order of need (interleaved across sequences); a page's mean is stored
    once, when it fills, and equals the float32 mean of its keys; a page not yet full has none."""
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(2, 3, 11, 8, generator=gen)
    cache = MobaKVCache(2, 3, 8, block_size=4, max_seqlen=12, dtype=torch.float32)
    cache.append(k[:, :, :5], k[:, :, :5], lengths=[5, 2])
    assert cache.page_table.tolist() == [[0, 1, -1], [2, -1, -1]]
    cache.append(k[:, :, 5:11], k[:, :, 5:11], lengths=[3, 6])
    assert cache.page_table.tolist() == [[0, 1, -1], [2, 3, -1]]
    assert cache.seqlens.tolist() == [8, 8]
    means = block_means(k, 4)                    # [2, 3, N, 8]; sequence 1's keys are rows 0-1 then 5-10
    torch.testing.assert_close(cache.means[0], means[0, :, 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache.means[1], means[0, :, 1], rtol=1e-6, atol=1e-6)
    seq1 = torch.cat([k[1, :, :2], k[1, :, 5:11]], dim=1)[None]
    torch.testing.assert_close(cache.means[2:4], block_means(seq1, 4)[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    kept = cache.means.clone()
    cache.append(k[:, :, :1], k[:, :, :1])       # no page fills: no mean changes
    assert torch.equal(cache.means, kept)
    assert (cache.means[4:] == 0).all()
    k_seq, _ = cache.sequence(1)
    torch.testing.assert_close(k_seq, torch.cat([seq1[0], k[1, :, :1]], dim=1))


def test_full_cache_raises_and_keeps_its_contents():
    cache = MobaKVCache(2, 1, 4, block_size=2, max_seqlen=5, dtype=torch.float32)
    x = torch.randn(2, 1, 5, 4)
    cache.append(x, x, lengths=[5, 3])
    k_pages = cache.k_pages.clone()
    with pytest.raises(ValueError, match="max_seqlen=5.*full"):
        cache.append(x[:, :, :1], x[:, :, :1])   # sequence 0 is full
    assert cache.seqlens.tolist() == [5, 3] and torch.equal(cache.k_pages, k_pages)
    cache.append(x[:, :, :2], x[:, :, :2], lengths=[0, 2])   # sequence 1 still has room
    assert cache.seqlens.tolist() == [5, 5]


def test_auto_is_torch_on_cpu_and_triton_is_deterministic():
    gen = torch.Generator().manual_seed(2)
    k, v = torch.randn(1, 2, 30, 16, generator=gen), torch.randn(1, 2, 30, 16, generator=gen)
    q = torch.randn(1, 2, 2, 16, generator=gen)
    cache = MobaKVCache(1, 2, 16, block_size=4, max_seqlen=30, dtype=torch.float32)
    cache.append(k, v)
    assert torch.equal(moba_decode(q, cache, top_k=3), moba_decode(q, cache, top_k=3, impl="torch"))
    assert torch.equal(moba_decode(q, cache, top_k=3, impl="triton"), moba_decode(q, cache, top_k=3, impl="triton"))


def test_bfloat16_cache_under_the_interpreter():
    """bfloat16 pages are computed in float32 under the interpreter; compare with the float64 reference
    of the rounded inputs (routing in float32 agrees: the same rounded keys)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 20, 8, generator=gen).bfloat16() for h in (2, 1, 1))
    cache = MobaKVCache(1, 1, 8, block_size=4, max_seqlen=20, dtype=torch.bfloat16)
    cache.append(k, v)
    o_ref, _ = reference_moba(q, k, v, 4, 2)
    for impl in ("torch", "triton"):
        o = moba_decode(q[:, :, -3:], cache, top_k=2, impl=impl)
        assert o.dtype == torch.bfloat16
        torch.testing.assert_close(o.double(), o_ref[:, :, -3:], atol=1e-2, rtol=1e-2)


def small_cache(**kw):
    cache = MobaKVCache(2, 2, 8, block_size=4, max_seqlen=8, dtype=torch.float32, **kw)
    cache.append(torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8))
    return cache


@pytest.mark.parametrize("call,error,match", [
    (lambda c: moba_decode(torch.randn(2, 4, 4, 8), c, top_k=2), ValueError, "q: .*cache holds only"),
    (lambda c: moba_decode(torch.randn(2, 3, 1, 8), c, top_k=2), ValueError, r"query heads \(q: 3\)"),
    (lambda c: moba_decode(torch.randn(3, 4, 1, 8), c, top_k=2), ValueError, "q holds a batch of 3"),
    (lambda c: moba_decode(torch.randn(2, 4, 1, 4), c, top_k=2), ValueError, "q must have shape"),
    (lambda c: moba_decode(torch.randn(2, 4, 1, 8).double(), c, top_k=2), TypeError, "q has dtype"),
    (lambda c: moba_decode(torch.randn(2, 4, 1, 8), c, top_k=0), ValueError, "top_k"),
    (lambda c: moba_decode(torch.randn(2, 4, 1, 8), c, top_k=2, impl="fast"), ValueError, "impl"),
    (lambda c: moba_decode(torch.randn(2, 4, 1, 8), c, top_k=2, lengths=[1]), ValueError, "lengths"),
    (lambda c: moba_decode(torch.randn(2, 4, 1, 8), c, top_k=2, lengths=[2, 1]), ValueError, "lengths"),
    (lambda c: moba_decode([0.0], c, top_k=2), TypeError, "q must be a torch.Tensor"),
    (lambda c: moba_decode(torch.randn(2, 4, 1, 8), "cache", top_k=2), TypeError, "cache"),
    (lambda c: c.append(torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)), ValueError, "k: appending 6"),
    (lambda c: c.append(torch.randn(2, 1, 1, 8), torch.randn(2, 1, 1, 8)), ValueError, "k must have shape"),
    (lambda c: c.append(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 2, 8)), ValueError, "v must have shape|same shape"),
    (lambda c: c.append(torch.randn(2, 2, 1, 8).half(), torch.randn(2, 2, 1, 8)), TypeError, "k has dtype"),
    (lambda c: c.append(torch.randn(2, 2, 1, 8, device="meta"), torch.randn(2, 2, 1, 8)), ValueError, "k is on meta"),
    (lambda c: MobaKVCache(2, 2, 8, block_size=0, max_seqlen=8, dtype=torch.float32), ValueError, "block_size"),
    (lambda c: MobaKVCache(2, 2, 8, block_size=4, max_seqlen=8, dtype=torch.int32), TypeError, "dtype"),
])
def test_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call(small_cache())


def test_triton_rejects_float64_by_name():
    cache = MobaKVCache(1, 1, 8, block_size=4, max_seqlen=8, dtype=torch.float64)
    cache.append(torch.randn(1, 1, 5, 8).double(), torch.randn(1, 1, 5, 8).double())
    with pytest.raises(TypeError, match="q: impl='triton'"):
        moba_decode(torch.randn(1, 1, 1, 8).double(), cache, top_k=2, impl="triton")


def test_decode_bytes_counts_what_a_step_reads():
    """bench.decode.decode_bytes against the cache's own tensors: all keys and values (dense); the means of
    the full pages and top_k pages of keys and values (MoBA)."""
    from moba_edu.bench.decode import decode_bytes

    cache = MobaKVCache(1, 2, 8, block_size=4, max_seqlen=50, dtype=torch.bfloat16)
    cache.append(torch.randn(1, 2, 50, 8).bfloat16(), torch.randn(1, 2, 50, 8).bfloat16())
    k, v = cache.sequence(0)
    full_pages = cache.page_table[0, :50 // 4].long()
    page_bytes = cache.k_pages[0].nbytes + cache.v_pages[0].nbytes
    assert decode_bytes(50, 2, 4, 3, D=8) == {"dense": k.nbytes + v.nbytes, "moba_means": cache.means[full_pages].nbytes,
                                              "moba_pages": 3 * page_bytes,
                                              "moba": cache.means[full_pages].nbytes + 3 * page_bytes}
    assert decode_bytes(6, 2, 4, 3, D=8)["moba_pages"] == 2 * page_bytes   # only 2 blocks exist
