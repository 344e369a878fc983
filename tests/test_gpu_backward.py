"""The Triton backward and the differentiable op on a CUDA GPU
(run: python3 -m pytest -m gpu -p no:nbval tests/test_gpu_backward.py).

Gradients in bf16 and fp16 against autograd through float64 attention per head up to S = 8K, and at
32K and 128K against autograd through the float32 torch rung (efficient.attend), in both cases given
the Triton router's routing (a near-tie may legitimately flip one block, docs/design.md §1); deterministic
mode; torch.compile(fullgraph=True) with Inductor; a few optimizer steps of a tiny model whose losses
track impl="naive". `python3 tests/test_gpu_backward.py` runs the compute-sanitizer shapes.
"""

import types

import pytest
import torch

import moba_edu as me
from moba_edu import efficient, kernels
from strategies import rel_err
from test_gpu_moba import float64_given_routing, global_routed, random_qkv

pytestmark = pytest.mark.gpu

if torch.cuda.is_available() and not kernels.INTERPRET:
    from moba_edu.kernels import layout
    from moba_edu.kernels.moba_bwd import moba_backward
    from moba_edu.kernels.op import moba_fwd

TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


def triton_grads(q, k, v, do, lengths, block_size, top_k, scale):
    """dq, dk, dv by the op, and the routing it used (int32 [Hq, T, R])."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    o, _, routed = moba_fwd(*leaves, list(lengths), block_size, top_k, scale)
    return torch.autograd.grad(o, leaves, do), routed


def reference_grads(fn, q, k, v, do, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    return torch.autograd.grad(fn(*leaves), leaves, do.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths,Hq,Hkv,D,block_size,top_k", [
    ((8192,), 4, 2, 128, 512, 3),
    ((4096,), 4, 1, 64, 128, 8),                  # grouped heads, g = 4
    ((1000, 0, 1, 2777), 4, 2, 128, 100, 4),      # packed, ragged tails, empty and length-1 sequences
    ((2048,), 2, 2, 96, 256, 20),                 # head dim 96; top_k past the number of blocks: dense
    pytest.param((1000, 0, 1, 2777), 4, 2, 192, 100, 4, id="head_dim192-packed"),   # padded to 256
    pytest.param((4096,), 4, 1, 256, 512, 3, id="head_dim256"),
])
def test_gradients_match_float64(dtype, lengths, Hq, Hkv, D, block_size, top_k):
    T = sum(lengths)
    q, k, v = random_qkv((T, Hq, D), (T, Hkv, D), dtype, 11)
    do = random_qkv((T, Hq, D), (T, Hq, D), dtype, 12)[0]
    scale = D ** -0.5
    got, routed = triton_grads(q, k, v, do, lengths, block_size, top_k, scale)
    sched = types.SimpleNamespace(routed=routed)
    want = reference_grads(lambda q, k, v: float64_given_routing(q, k, v, sched, lengths, block_size, scale)[0],
                           q, k, v, do, torch.float64)
    for name, g, g_ref in zip("qkv", got, want):
        assert g.dtype == dtype and g.isfinite().all(), f"d{name}"
        assert rel_err(g, g_ref) < TOL[dtype], f"d{name}: {rel_err(g, g_ref):.3g}"


@pytest.mark.parametrize("S,Hq,Hkv,block_size,top_k", [(32768, 16, 16, 512, 3), (32768, 32, 8, 128, 8),
                                                       (131072, 4, 4, 512, 3)])
def test_long_gradients_match_torch_rung(S, Hq, Hkv, block_size, top_k):
    q, k, v = random_qkv((1, Hq, S, 128), (1, Hkv, S, 128), torch.bfloat16, 13)
    do = random_qkv((1, Hq, S, 128), (1, Hq, S, 128), torch.bfloat16, 14)[0]
    scale = 128 ** -0.5
    got, routed = triton_grads(q, k, v, do, (S,) * 1, block_size, top_k, scale)
    sched = types.SimpleNamespace(routed=routed, layout=layout.layout((S,), block_size, q.device, True))
    table = efficient.BlockTable.build(torch.tensor([0, S], device="cuda"), S, block_size)
    pack = lambda x: x[0].transpose(0, 1)  # noqa: E731  [1, H, S, D] -> [S, H, D]
    want = reference_grads(lambda q, k, v: efficient.attend(pack(q), pack(k), pack(v), table, global_routed(sched),
                                                            scale)[0], q, k, v, do[0].transpose(0, 1).contiguous(),
                           torch.float32)
    for name, g, g_ref in zip("qkv", got, want):
        assert rel_err(g, g_ref) < 2e-2, f"d{name}: {rel_err(g, g_ref):.3g}"


@pytest.mark.parametrize("D,block_size,top_k", [(192, 512, 3), (256, 128, 8)])
def test_large_head_dim_gradients_match_torch_rung(D, block_size, top_k):
    """Head dims past 128 (smaller tiles, launch_config), S = 4K, 8 query / 2 key-value heads: the
    op's gradients against autograd through the float32 torch rung given the same routing, and the
    deterministic path against the atomic one."""
    S, scale = 4096, D ** -0.5
    q, k, v = random_qkv((1, 8, S, D), (1, 2, S, D), torch.bfloat16, 21)
    do = random_qkv((1, 8, S, D), (1, 8, S, D), torch.bfloat16, 22)[0]
    got, routed = triton_grads(q, k, v, do, (S,), block_size, top_k, scale)
    lay = layout.layout((S,), block_size, q.device, True)
    sched = types.SimpleNamespace(routed=routed, layout=lay)
    table = efficient.BlockTable.build(torch.tensor([0, S], device="cuda"), S, block_size)
    pack = lambda x: x[0].transpose(0, 1)  # noqa: E731  [1, H, S, D] -> [S, H, D]
    want = reference_grads(lambda q, k, v: efficient.attend(pack(q), pack(k), pack(v), table, global_routed(sched),
                                                            scale)[0], q, k, v, pack(do).contiguous(), torch.float32)
    for name, g, g_ref in zip("qkv", got, want):
        assert rel_err(g, g_ref) < 2e-2, f"d{name}: {rel_err(g, g_ref):.3g}"
    with torch.no_grad():
        o, lse, _ = moba_fwd(q, k, v, [S], block_size, top_k, scale)
    deterministic = moba_backward(do, q, k, v, o, lse, routed, lay, scale, deterministic=True, partial_budget=2**24)
    for name, a, b in zip("qkv", deterministic, got):
        assert rel_err(a, b) < 1e-2, f"d{name}"


@pytest.mark.parametrize("block_size,top_k,D", [(128, 8, 128), (512, 3, 128), (256, 4, 256)])
def test_routed_dq_paths_agree(block_size, top_k, D):
    """The routed dQ by atomic adds and per slot (launch_config's DQ, picked by block size), the latter
    in one chunk and in many, against float64 attention given the same routing."""
    lengths, Hq, Hkv = (3000, 1, 2100), 4, 2
    T, scale = sum(lengths), D ** -0.5
    q, k, v = random_qkv((T, Hq, D), (T, Hkv, D), torch.bfloat16, 23)
    do = random_qkv((T, Hq, D), (T, Hq, D), torch.bfloat16, 24)[0]
    with torch.no_grad():
        o, lse, routed = moba_fwd(q, k, v, list(lengths), block_size, top_k, scale)
    lay = layout.layout(lengths, block_size, q.device, False)
    sched = types.SimpleNamespace(routed=routed)
    want = reference_grads(lambda q, k, v: float64_given_routing(q, k, v, sched, lengths, block_size, scale)[0],
                           q, k, v, do, torch.float64)
    for dq, budget in (("atomic", None), ("slots", None), ("slots", 2**22)):
        got = moba_backward(do, q, k, v, o, lse, routed, lay, scale, deterministic=False, partial_budget=budget,
                            config=dict(DQ=dq))
        for name, g, g_ref in zip("qkv", got, want):
            assert rel_err(g, g_ref) < TOL[torch.bfloat16], f"d{name} ({dq}, budget {budget}): {rel_err(g, g_ref):.3g}"


def test_deterministic_mode_on_gpu():
    """Deterministic mode gives the same bits every run, with any partial buffer agrees to rounding,
    and so does the atomic path (whose last bits vary from run to run)."""
    lengths = (6000, 3000)
    q, k, v = random_qkv((9000, 8, 128), (9000, 2, 128), torch.bfloat16, 15)
    do = random_qkv((9000, 8, 128), (9000, 8, 128), torch.bfloat16, 16)[0]
    o, lse, routed = moba_fwd(q, k, v, list(lengths), 256, 6, 0.1)
    lay = layout.layout(lengths, 256, q.device, False)
    run = lambda **kw: moba_backward(do, q, k, v, o, lse, routed, lay, 0.1, **kw)  # noqa: E731
    first, second = run(deterministic=True), run(deterministic=True)
    chunked, atomic = run(deterministic=True, partial_budget=2**24), run(deterministic=False)
    for a, b, c, d in zip(first, second, chunked, atomic):
        assert torch.equal(a, b)
        assert rel_err(c, a) < 1e-2 and rel_err(d, a) < 1e-2
    torch.use_deterministic_algorithms(True)   # the public switch reaches the op's backward
    try:
        again = [triton_grads(q, k, v, do, lengths, 256, 6, 0.1)[0] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(*again))


def test_compile_fullgraph_inductor():
    q, k, v = (x.requires_grad_() for x in random_qkv((2, 8, 4096, 128), (2, 2, 4096, 128), torch.bfloat16, 17))
    fn = lambda q, k, v: me.moba_attention(q, k, v, block_size=256, top_k=4, impl="triton") * 2  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    do = torch.randn_like(q)
    for _ in range(2):  # the second call runs the cached graph
        o = compiled(q, k, v)
        got = torch.autograd.grad(o, (q, k, v), do)
    o_eager = fn(q, k, v)
    want = torch.autograd.grad(o_eager, (q, k, v), do)
    assert rel_err(o, o_eager) < 1e-3
    assert all(rel_err(g, w) < 1e-3 for g, w in zip(got, want))


class TinyLM(torch.nn.Module):
    """Embedding, two pre-norm MoBA attention blocks with MLPs, tied output: enough to train a little."""

    def __init__(self, vocab=97, dim=256, heads=4, kv_heads=2, impl="triton"):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        nn = torch.nn
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(norm1=nn.LayerNorm(dim), qkv=nn.Linear(dim, dim + 2 * dim * kv_heads // heads),
                               out=nn.Linear(dim, dim), norm2=nn.LayerNorm(dim),
                               mlp=nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))))
            for _ in range(2))
        self.heads, self.kv_heads, self.impl = heads, kv_heads, impl

    def forward(self, tokens):
        x = self.embed(tokens)
        B, S, dim = x.shape
        D = dim // self.heads
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["norm1"](x)).split([dim, D * self.kv_heads, D * self.kv_heads], dim=-1)
            q, k, v = (t.view(B, S, -1, D).transpose(1, 2) for t in (q, k, v))
            a = me.moba_attention(q, k, v, block_size=64, top_k=3, impl=self.impl)
            x = x + blk["out"](a.transpose(1, 2).reshape(B, S, dim))
            x = x + blk["mlp"](blk["norm2"](x))
        return x @ self.embed.weight.T


def test_training_steps_track_naive():
    torch.manual_seed(0)
    tokens = torch.randint(0, 97, (2, 513), device="cuda")
    losses = {}
    for impl in ("naive", "triton"):
        torch.manual_seed(1)
        model = TinyLM(impl=impl).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[impl] = []
        for _ in range(6):
            logits = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), tokens[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[impl].append(loss.item())
    assert losses["triton"][-1] < losses["triton"][0] - 0.1   # it learns
    for a, b in zip(losses["triton"], losses["naive"]):
        assert abs(a - b) < 2e-3 * abs(b), losses


def sanitize_shapes():
    """Backward kernels at one aligned and one ragged shape (S <= 4K; the routed dQ per slot at block 256,
    by atomics at block 100; deterministic mode at both), for
    compute-sanitizer (from the repository root, with PYTHONPATH=.):
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 tests/test_gpu_backward.py"""
    shapes = [((4096,), 4, 2, 128, 256, 4), ((1000, 0, 1, 2777), 4, 1, 96, 100, 5)]
    for lengths, Hq, Hkv, D, block_size, top_k in shapes:
        T = sum(lengths)
        q, k, v = random_qkv((T, Hq, D), (T, Hkv, D), torch.bfloat16, 18)
        do = random_qkv((T, Hq, D), (T, Hq, D), torch.bfloat16, 19)[0]
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            grads, _ = triton_grads(q, k, v, do, lengths, block_size, top_k, D ** -0.5)
            torch.cuda.synchronize()
            print(f"lengths {lengths}, deterministic {deterministic}: gradients finite: "
                  f"{all(bool(g.isfinite().all()) for g in grads)}")
        torch.use_deterministic_algorithms(False)


if __name__ == "__main__":
    sanitize_shapes()
