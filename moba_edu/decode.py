"""Decoding with MoBA: a paged KV cache that keeps each full page's mean key, and `moba_decode`
(docs/design.md §2a).

Why it is exact. Query t attends its own block causally and the top_k - 1 best blocks wholly before
its own block, ranked by q_t . mean(k_j). Every block it can route to is complete and in the past, so
its mean never changes again: it is computed once, when the block fills, and kept in float32. A new
token therefore needs only the stored means (one [D] vector per block) to route, and then reads the
keys and values of top_k blocks, never the whole cache.

Paging. The cache is a pool of pages of `block_size` tokens, [P, block_size, Hkv, D] for keys and
for values (the NHD page layout of vLLM and FlashInfer), a float32 mean per page [P, Hkv, D], and a
page table int32 [B, pages per sequence] mapping block j of sequence b to its page (-1: none yet).
A MoBA block *is* a page: routing picks pages. Pages are handed out in the order they are needed,
so the pages of one sequence interleave with the others' in the pool.

Ragged batches. `append(k, v, lengths=...)` appends the first lengths[b] rows of k[b] and v[b]
(right padding), so sequences in one cache may have different lengths (`cache.seqlens`). In
`moba_decode(q, cache, lengths=...)` row i < lengths[b] of q[b] is the query of the token at position
seqlens[b] - lengths[b] + i: the last lengths[b] tokens of sequence b, in order; padding rows give
zeros. Without `lengths`, every sequence's last s tokens (s = q.shape[2]).

Prefill. `cache.append(k, v)` of the prompt, then `moba_decode(q, cache)` with the prompt's
queries: when every query row is its whole sequence (nothing was cached before), the torch and
triton rungs run `moba_attention_varlen` on the cached keys (the forward rungs; a prompt has many
queries), else they use the decode path below, which also serves chunked prefill.

Rungs: "naive" recomputes moba_attention over each whole cached sequence with the naive rung and
keeps the query rows; "torch" routes from the stored means and gathers the routed pages;
"triton" is kernels/decode.py (route one token per (sequence, head) from the stored means, then
attend the selected pages split across programs, merged by log-sum-exp); "auto" picks triton on
CUDA for inputs it takes, else torch.
"""

from __future__ import annotations

import torch

from . import naive
from .api import moba_attention_varlen
from .inputs import FLOAT_DTYPES, check_impl, check_int, check_scale
from .routing import block_means, num_blocks

# Gathered key/value elements the torch rung may hold at once (a chunk of query rows at a time).
GATHER_BUDGET = 2**24
# Key elements whose block means `append` computes at once (it makes a float32 copy of them).
MEANS_BUDGET = 2**26


class MobaKVCache:
    """A paged KV cache for MoBA decoding (module docstring).

    k_pages, v_pages: [P, block_size, Hkv, D] (dtype); means: float32 [P, Hkv, D], the mean key of each
    full page; page_table: int32 [B, pages per sequence], -1 where no page is assigned yet;
    seqlens: int64 [B] (host), the tokens held per sequence. P = B * ceil(max_seqlen / block_size).
    """

    def __init__(self, batch_size, num_kv_heads, head_dim, *, block_size, max_seqlen, dtype, device=None):
        self.batch_size = check_int(batch_size, "batch_size")
        self.num_kv_heads = check_int(num_kv_heads, "num_kv_heads")
        self.head_dim = check_int(head_dim, "head_dim")
        self.block_size = check_int(block_size, "block_size")
        self.max_seqlen = check_int(max_seqlen, "max_seqlen")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
        self.dtype = dtype
        # the device a tensor made there reports ("cuda" -> "cuda:0"), so that comparisons with inputs hold
        self.device = torch.empty(0, device=device if device is not None else "cpu").device
        pages_per_seq = num_blocks(self.max_seqlen, self.block_size)
        n_pages = self.batch_size * pages_per_seq
        shape = (n_pages, self.block_size, self.num_kv_heads, self.head_dim)
        self.k_pages = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_pages = torch.zeros(shape, dtype=dtype, device=self.device)
        self.means = torch.zeros(n_pages, self.num_kv_heads, self.head_dim, dtype=torch.float32, device=self.device)
        self.page_table = torch.full((self.batch_size, pages_per_seq), -1, dtype=torch.int32, device=self.device)
        self.seqlens = torch.zeros(self.batch_size, dtype=torch.int64)
        self._table = [[-1] * pages_per_seq for _ in range(self.batch_size)]  # host copy of page_table
        self._pages_used = 0

    def append(self, k, v, lengths=None) -> None:
        """Append new tokens: k, v [B, Hkv, s, D]; row i of sequence b is appended if i < lengths[b]
        (lengths: ints or an int tensor [B], default s for all). Pages that fill get their mean."""
        self._check(k, "k")
        self._check(v, "v")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
        lengths = check_lengths(lengths, self.batch_size, k.shape[2], "lengths")
        new_end = self.seqlens + lengths
        if (new_end > self.max_seqlen).any():
            b = int((new_end > self.max_seqlen).nonzero()[0])
            raise ValueError(f"k: appending {int(lengths[b])} tokens to sequence {b}, which holds "
                             f"{int(self.seqlens[b])}, exceeds the cache's max_seqlen={self.max_seqlen} (the cache is full)")
        rows = torch.arange(k.shape[2])
        batch, row = (rows[None, :] < lengths[:, None]).nonzero(as_tuple=True)
        pos = self.seqlens[batch] + row
        for b in range(self.batch_size):   # blocks touched, in (sequence, block) order: O(B + pages) host work
            if int(lengths[b]):
                for j in range(int(self.seqlens[b]) // self.block_size, int(new_end[b] - 1) // self.block_size + 1):
                    if self._table[b][j] < 0:  # a new page: the next free one in the pool
                        self._table[b][j] = self._pages_used
                        self._pages_used += 1
        self.page_table.copy_(torch.tensor(self._table, dtype=torch.int32))
        table = torch.tensor(self._table, dtype=torch.int64)
        page, slot = table[batch, pos // self.block_size].to(self.device), (pos % self.block_size).to(self.device)
        bd, rd = batch.to(self.device), row.to(self.device)
        self.k_pages[page, slot] = k.detach()[bd, :, rd]   # [n, Hkv, D] rows
        self.v_pages[page, slot] = v.detach()[bd, :, rd]
        full = torch.cat([table[b, int(self.seqlens[b]) // self.block_size:int(new_end[b]) // self.block_size]
                          for b in range(self.batch_size)])
        per_chunk = max(1, MEANS_BUDGET // (self.block_size * self.num_kv_heads * self.head_dim))
        for chunk in full.split(per_chunk):  # the float32 mean of each page that just filled, once
            pages = chunk.to(self.device)
            self.means[pages] = block_means(self.k_pages[pages].transpose(1, 2), self.block_size)[:, :, 0]
        self.seqlens = new_end

    def sequence(self, b: int):
        """The cached keys and values of sequence b in order: k, v [Hkv, seqlens[b], D]."""
        n = int(self.seqlens[b])
        pages = self.page_table[b, :num_blocks(n, self.block_size)].long()
        k, v = (x[pages].flatten(0, 1)[:n].transpose(0, 1) for x in (self.k_pages, self.v_pages))
        return k, v

    def check_matches(self, x, name: str) -> None:
        """x must be a tensor of the cache's dtype, on its device (keys, values or queries)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but the cache holds {self.dtype}")
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device} but the cache is on {self.device}")

    def _check(self, x, name: str) -> None:
        """x: [B, Hkv, s, D] of the cache's dtype and device."""
        self.check_matches(x, name)
        B, H, D = self.batch_size, self.num_kv_heads, self.head_dim
        if x.dim() != 4 or x.shape[0] != B or x.shape[1] != H or x.shape[3] != D:
            raise ValueError(f"{name} must have shape [B={B}, Hkv={H}, s, D={D}] for this cache, got {tuple(x.shape)}")


def check_lengths(lengths, batch_size: int, s: int, name: str) -> torch.Tensor:
    """None (s for every sequence), a sequence of ints or an int tensor [B] with 0 <= lengths[b] <= s
    -> int64 CPU tensor [B]."""
    if lengths is None:
        return torch.full((batch_size,), s, dtype=torch.int64)
    if isinstance(lengths, torch.Tensor):
        if lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers, got {lengths.dtype}")
        lengths = lengths.detach().cpu().tolist()
    lengths = torch.tensor([check_int(n, name, minimum=0) for n in lengths], dtype=torch.int64)
    if lengths.shape != (batch_size,):
        raise ValueError(f"{name} must have one entry per sequence ({batch_size}), got {lengths.numel()}")
    if (lengths > s).any():
        raise ValueError(f"{name} must be at most s = {s} (the rows given), got {lengths.tolist()}")
    return lengths


def moba_decode(q, cache: MobaKVCache, *, top_k, scale=None, impl="auto", lengths=None, return_lse=False):
    """MoBA attention of the last tokens' queries over a MobaKVCache.

    q: [B, Hq, s, D] (Hq a multiple of the cache's Hkv); row i < lengths[b] of q[b] is the query of the
    token at position cache.seqlens[b] - lengths[b] + i (module docstring). Returns o [B, Hq, s, D] in
    q's dtype (zeros in padding rows) and, with return_lse, lse float32 [B, Hq, s] (float64 for float64
    q; -inf in padding rows): row by row what `moba_attention` over the whole sequence gives.
    """
    if not isinstance(cache, MobaKVCache):
        raise TypeError(f"cache must be a MobaKVCache, got {type(cache).__name__}")
    cache.check_matches(q, "q")
    if q.dim() != 4 or q.shape[3] != cache.head_dim:
        raise ValueError(f"q must have shape [B, Hq, s, D={cache.head_dim}], got {tuple(q.shape)}")
    if q.shape[0] != cache.batch_size:
        raise ValueError(f"q holds a batch of {q.shape[0]} but the cache holds {cache.batch_size} sequences")
    if q.shape[1] % cache.num_kv_heads:
        raise ValueError(f"the number of query heads (q: {q.shape[1]}) must be a multiple of the cache's "
                         f"key/value heads ({cache.num_kv_heads})")
    top_k = check_int(top_k, "top_k")
    scale = check_scale(scale, q.shape[-1])
    check_impl(impl)
    lengths = check_lengths(lengths, q.shape[0], q.shape[2], "lengths")
    if (lengths > cache.seqlens).any():
        raise ValueError(f"q: {lengths.tolist()} query rows per sequence but the cache holds only "
                         f"{cache.seqlens.tolist()} tokens (append k and v first)")
    rung = _pick(impl, q)
    with torch.no_grad():
        if int(lengths.sum()) == 0:                                             # no query row at all
            o, lse = _padded_outputs(q)
        else:
            o, lse = rung(q.detach(), cache, top_k, scale, cache.seqlens - lengths, lengths)
    return (o, lse) if return_lse else o


def _pick(impl: str, q):
    """The rung function for impl (api.py's rule: auto is triton on CUDA for inputs it takes, else torch)."""
    if impl == "triton" or (impl == "auto" and q.is_cuda):
        from . import kernels
        error = kernels.unsupported(q, q, q)
        if impl == "triton" and error is not None:
            raise error
        if error is None:
            from .kernels.decode import decode
            return _with_prefill("triton", decode)
    return naive_decode if impl == "naive" else _with_prefill("torch", torch_decode)


def _with_prefill(impl: str, rung):
    """A rung that runs moba_attention_varlen (the forward rung `impl`) when every query row is its
    whole sequence, i.e. a prefill into an empty cache, and `rung` otherwise."""
    def run(q, cache, top_k, scale, start, lengths):
        if int(start.max()) > 0:
            return rung(q, cache, top_k, scale, start, lengths)
        B, Hq, s, D = q.shape
        valid = torch.arange(s)[None, :] < lengths[:, None]                      # [B, s]
        k, v = (torch.cat([cache.sequence(b)[i].transpose(0, 1) for b in range(B)]) for i in (0, 1))
        cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(q.device)
        packed = q.transpose(1, 2)[valid.to(q.device)]                             # [T, Hq, D]
        o_p, lse_p = moba_attention_varlen(packed, k, v, cu, int(lengths.max()), block_size=cache.block_size,
                                           top_k=top_k, scale=scale, impl=impl, return_lse=True)
        o, lse = _padded_outputs(q)
        o.transpose(1, 2)[valid.to(q.device)] = o_p
        lse.transpose(1, 2)[valid.to(q.device)] = lse_p.transpose(0, 1).to(lse.dtype)
        return o, lse
    return run


def _padded_outputs(q):
    """o zeros like q, lse -inf [B, Hq, s] (float32; float64 for float64 q): what padding rows hold."""
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.zeros_like(q), q.new_full(q.shape[:3], float("-inf"), dtype=lse_dtype)


def naive_decode(q, cache, top_k, scale, start, lengths):
    """Rung 1: naive.moba_attention over each whole cached sequence, keeping the query rows.
    q [B, Hq, s, D]; start, lengths int64 [B] -> o [B, Hq, s, D], lse [B, Hq, s]."""
    o, lse = _padded_outputs(q)
    for b in range(q.shape[0]):
        n, t0 = int(lengths[b]), int(start[b])
        if n == 0:
            continue
        k, v = cache.sequence(b)
        full_q = q.new_zeros(q.shape[1], t0 + n, q.shape[3])
        full_q[:, t0:] = q[b, :, :n]
        o_b, lse_b = naive.moba_attention(full_q[None], k[None], v[None], cache.block_size, top_k, scale)
        o[b, :, :n], lse[b, :, :n] = o_b[0, :, t0:], lse_b[0, :, t0:]
    return o, lse


def torch_decode(q, cache, top_k, scale, start, lengths):
    """Rung 2: route each query from the stored page means, gather its top_k pages, softmax over them.
    q [B, Hq, s, D]; start, lengths int64 [B] -> o [B, Hq, s, D], lse [B, Hq, s]."""
    B, Hq, s, D = q.shape
    bs = cache.block_size
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    pos = (start[:, None] + torch.arange(s)).to(q.device)                       # [B, s] absolute positions
    valid = (torch.arange(s)[None, :] < lengths[:, None]).to(q.device)
    own = torch.where(valid, pos // bs, 0)
    n_eligible = int(own.max())                                                 # blocks 0 .. own - 1 of a row
    n_routed = min(top_k - 1, n_eligible)
    g = Hq // cache.num_kv_heads
    head = torch.arange(Hq, device=q.device) // g
    table = cache.page_table.long()
    chosen = own[:, None, :, None].expand(B, Hq, s, 1)                           # [B, Hq, s, 1 + R]
    if n_routed:
        pages = table[:, :n_eligible].clamp_min(0)                              # full pages (others masked)
        means = cache.means[pages][:, :, head].permute(0, 2, 1, 3)              # [B, Hq, n_eligible, D]
        gates = q.float() @ means.transpose(-1, -2)                             # [B, Hq, s, n_eligible]
        j = torch.arange(n_eligible, device=q.device)
        gates = gates.masked_fill(j >= own[:, None, :, None], float("-inf"))    # only wholly earlier blocks
        best, routed = gates.topk(n_routed, dim=-1)
        chosen = torch.cat([chosen, routed.masked_fill(best == float("-inf"), -1)], dim=-1)
    o, lse = _padded_outputs(q)
    rows = max(1, GATHER_BUDGET // max(1, B * Hq * chosen.shape[-1] * bs * D))
    for r0 in range(0, s, rows):
        sl = slice(r0, r0 + rows)
        o[:, :, sl], lse[:, :, sl] = _attend_pages(q[:, :, sl].to(compute), cache, chosen[:, :, sl], pos[:, sl],
                                                   valid[:, sl], head, scale)
    return o, lse


def _attend_pages(q, cache, chosen, pos, valid, head, scale):
    """Softmax attention of q [B, Hq, m, D] over the chosen blocks int64 [B, Hq, m, K] (-1: none), own
    block causally (keys <= pos [B, m]); valid bool [B, m] -> o [B, Hq, m, D], lse [B, Hq, m]."""
    bs = cache.block_size
    B = q.shape[0]
    page = cache.page_table.long()[torch.arange(B, device=q.device)[:, None, None, None], chosen.clamp_min(0)]
    hk = head[None, :, None, None, None]
    slot = torch.arange(bs, device=q.device)
    k, v = (x[page[..., None], slot, hk].to(q.dtype) for x in (cache.k_pages, cache.v_pages))  # [B,Hq,m,K,bs,D]
    key_pos = chosen[..., None] * bs + slot                                     # [B, Hq, m, K, bs]
    attended = (chosen[..., None] >= 0) & (key_pos <= pos[:, None, :, None, None]) & valid[:, None, :, None, None]
    scores = torch.einsum("bhmd,bhmkjd->bhmkj", q, k) * scale
    scores = scores.masked_fill(~attended, float("-inf")).flatten(-2)          # [B, Hq, m, K * bs]
    lse = scores.logsumexp(-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)                # padding rows: all -inf
    o = torch.einsum("bhmn,bhmnd->bhmd", probs, v.flatten(3, 4))
    return o, lse
