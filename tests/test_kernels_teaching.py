"""The teaching MoBA kernel (moba_edu/kernels/teaching.py) against the float64 reference: the forward
given the routing, its online-softmax step alone, the dK/dV step against autograd, and the pair count.
CPU tests run under Triton's interpreter (small shapes); GPU tests (marked gpu) compare float16 and
bfloat16 inputs against float64 with a fixed routing."""

import math

import pytest
import torch
from hypothesis import given, settings

import moba_edu as me
from moba_edu import kernels
from reference import reference_moba, reference_routing_mask
from strategies import cases, rel_err

from moba_edu.kernels import teaching  # noqa: E402 (after moba_edu.kernels set the interpreter up)

interpreter = pytest.mark.skipif(not kernels.INTERPRET, reason="runs the kernel under the CPU interpreter")
FEW = settings(max_examples=8)


@interpreter
@FEW
@given(case=cases(max_s=40, head_dims=(4, 8, 16)))
def test_forward_matches_the_reference(case):
    q, k, v = case.tensors(torch.float32)
    indices = me.route(q, k, block_size=case.block_size, top_k=case.top_k).indices
    o, lse = teaching.moba_forward(q, k, v, indices, case.block_size)
    o_ref, lse_ref = reference_moba(q, k, v, case.block_size, case.top_k)
    assert o.dtype == torch.float32 and lse.shape == (case.B, case.Hq, case.S)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(lse, lse_ref) < 1e-5


@interpreter
@pytest.mark.parametrize("block_size, block_m, block_n", [(32, 16, 16), (12, 16, 16), (40, 32, 16)])
def test_tiles_inside_blocks_and_ragged_key_tiles(block_size, block_m, block_n):
    """Several query tiles per block, blocks shorter than a tile, key tiles hanging past a block."""
    gen = torch.Generator().manual_seed(block_size)
    q, k, v = (torch.randn(1, h, 90, 8, generator=gen) for h in (2, 1, 1))
    indices = me.route(q, k, block_size=block_size, top_k=3).indices
    o, lse = teaching.moba_forward(q, k, v, indices, block_size, scale=0.3, block_m=block_m, block_n=block_n)
    o_ref, lse_ref = reference_moba(q, k, v, block_size, 3, scale=0.3)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(lse, lse_ref) < 1e-5


@interpreter
def test_attend_step_folds_tiles_into_a_softmax():
    gen = torch.Generator().manual_seed(3)
    M, N, D, n, scale = 16, 16, 16, 3, 5.0            # scores near 60: a plain exp would overflow float32
    q, k, v = torch.randn(M, D, generator=gen), torch.randn(n, N, D, generator=gen), torch.randn(n, N, D, generator=gen)
    visible = torch.rand(n, M, N, generator=gen) < 0.5
    visible[0, :, 0] = True
    m, l, acc = torch.full((M,), -math.inf), torch.zeros(M), torch.zeros(M, D)
    teaching.run_attend_step(q, k, v, visible, m, l, acc, scale)
    s = (scale * torch.einsum("md,tnd->mtn", q.double(), k.double())).reshape(M, -1)
    s = s.masked_fill(~visible.transpose(0, 1).reshape(M, -1), -math.inf)
    assert rel_err(acc / l[:, None], s.softmax(-1) @ v.double().reshape(-1, D)) < 1e-6
    assert rel_err(m + l.log(), s.logsumexp(-1)) < 1e-6


def block_case(seed, S=40, D=8, W=12, key0=12, scale=0.35):
    """A key block seen causally by its own queries and whole by some later ones, each of which also
    attends keys outside the block: float64 tensors, lse and Delta, and autograd's dk, dv of the block."""
    gen = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(S, D, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(W, D, generator=gen, dtype=torch.float64) for _ in range(2))
    later = torch.arange(key0 + W, S)
    rows = torch.cat([torch.arange(key0, key0 + W), later[torch.rand(len(later), generator=gen) < 0.5]])
    extra_k, extra_v = (torch.randn(len(rows), 5, D, generator=gen, dtype=torch.float64) for _ in range(2))
    leaves = [k.clone().requires_grad_(), v.clone().requires_grad_()]
    s = (scale * q[rows] @ leaves[0].T).masked_fill((key0 + torch.arange(W))[None, :] > rows[:, None], -math.inf)
    s = torch.cat([s, scale * torch.einsum("rd,rnd->rn", q[rows], extra_k)], 1)
    o = torch.einsum("rn,rnd->rd", s.softmax(1), torch.cat([leaves[1].expand(len(rows), -1, -1), extra_v], 1))
    lse, delta = torch.zeros(S, dtype=torch.float64), torch.zeros(S, dtype=torch.float64)
    lse[rows], delta[rows] = s.logsumexp(1).detach(), (do[rows] * o).sum(1).detach()
    dk, dv = torch.autograd.grad(o, leaves, do[rows])
    return (q, do, lse, delta, rows, k, v, key0, scale), dk, dv


@interpreter
@pytest.mark.parametrize("seed", [0, 1])
def test_dkdv_step_matches_autograd(seed):
    args, dk_ref, dv_ref = block_case(seed)
    dk, dv = teaching.block_grads(*args)
    assert rel_err(dk, dk_ref) < 1e-5 and rel_err(dv, dv_ref) < 1e-5


def test_tile_blocks_is_the_union_of_each_tiles_routed_blocks():
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(2, 2, 70, 8, generator=gen) for _ in range(2))
    indices = me.route(q, k, block_size=20, top_k=3).indices
    blocks, counts = teaching.tile_blocks(indices, 20, 16)
    for b in range(2):
        for h in range(2):
            for tile in range(blocks.shape[2]):
                start = (tile // 2) * 20 + (tile % 2) * 16
                rows = indices[b, h, start:min(start + 16, (tile // 2 + 1) * 20, 70), 1:]
                expected = sorted(set(rows[rows >= 0].tolist()))
                got = blocks[b, h, tile, :counts[b, h, tile]].tolist()
                assert got == expected and (blocks[b, h, tile, counts[b, h, tile]:] == -1).all()


@pytest.mark.parametrize("S, block_size, top_k, block_m, block_n", [(70, 20, 3, 16, 16), (64, 16, 2, 16, 16),
                                                                    (100, 12, 4, 8, 16)])
def test_pair_counts(S, block_size, top_k, block_m, block_n):
    gen = torch.Generator().manual_seed(S)
    q, k = (torch.randn(1, 1, S, 8, generator=gen) for _ in range(2))
    indices = me.route(q, k, block_size=block_size, top_k=top_k).indices
    counts = teaching.pair_counts(indices, block_size, block_m, block_n)
    mask = reference_routing_mask(q[0, 0], k[0, 0], block_size, top_k).repeat_interleave(block_size, 1)[:, :S]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    same_block = (torch.arange(S)[:, None] // block_size) == (torch.arange(S)[None, :] // block_size)
    assert counts["own"][0] == int((mask & causal & same_block).sum())
    assert counts["routed"][0] == int((mask & ~same_block).sum())
    own_computed = routed_computed = 0                         # the kernel's visits, program by program
    for start in range(0, S, block_size):
        for q0 in range(start, min(start + block_size, S), block_m):
            q_end = min(q0 + block_m, start + block_size, S)
            own_computed += block_m * block_n * -(-(q_end - start) // block_n)
            union = {j for j in indices[0, 0, q0:q_end, 1:].flatten().tolist() if j >= 0}
            routed_computed += len(union) * block_m * block_n * -(-block_size // block_n)
    assert counts["own"][1] == own_computed and counts["routed"][1] == routed_computed
    assert counts["routed"][1] >= counts["routed"][0]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 3e-3), (torch.bfloat16, 1.5e-2), (torch.float32, 3e-3)])
@pytest.mark.parametrize("shape", [(2, 4, 2, 300, 64, 64, 3), (1, 2, 1, 1000, 128, 128, 4), (1, 2, 2, 77, 16, 20, 9)])
def test_forward_on_gpu(dtype, tol, shape):
    B, Hq, Hkv, S, D, block_size, top_k = shape
    gen = torch.Generator().manual_seed(S)
    q, k, v = (torch.randn(B, h, S, D, generator=gen).to("cuda", dtype) for h in (Hq, Hkv, Hkv))
    indices = me.route(q, k, block_size=block_size, top_k=top_k).indices    # fixed routing for both
    o, lse = teaching.moba_forward(q, k, v, indices, block_size)
    mask = me.routing.indices_to_mask(indices, -(-S // block_size)).repeat_interleave(block_size, -1)[..., :S]
    mask &= torch.ones(S, S, dtype=torch.bool, device="cuda").tril()
    g = Hq // Hkv
    s = q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) / math.sqrt(D)
    s = s.masked_fill(~mask, -math.inf)
    assert o.dtype == dtype
    assert rel_err(o, s.softmax(-1) @ v.double().repeat_interleave(g, 1)) < tol
    assert rel_err(lse, s.logsumexp(-1)) < tol


@pytest.mark.gpu
def test_dkdv_step_on_gpu():
    args, dk_ref, dv_ref = block_case(4)
    q, do, lse, delta, rows, k, v, key0, scale = args
    dk, dv = teaching.block_grads(*(x.cuda() for x in (q, do, lse, delta, rows, k, v)), key0, scale)
    assert rel_err(dk.cpu(), dk_ref) < 5e-3 and rel_err(dv.cpu(), dv_ref) < 5e-3


@pytest.mark.parametrize("change, name", [("indices", "indices"), ("heads", "q")])
def test_bad_input_is_named(change, name):
    q, k, v = (torch.randn(1, h, 8, 4) for h in (2, 1, 1))
    indices = torch.zeros(1, 2, 8, 1, dtype=torch.int64)
    if change == "indices":
        indices = indices[:, :1]
    else:
        k, v = torch.randn(2, 1, 3, 8, 4).unbind(0)   # 2 query heads cannot share 3 key/value heads
    with pytest.raises(ValueError, match=f"^{name}:"):
        teaching.moba_forward(q, k, v, indices, 4)
