"""Routing variants (moba_edu.variants) and attention given any routing (efficient.attention_given_routing).

Each variant is checked against an independent float64 computation of its own scores: the chosen
blocks must be a top-(top_k - 1) of the eligible ones up to float32 rounding. Where a variant reduces
to MoBA (identity convolution, tile size 1, max over one key) it must pass tests/reference.py's
`assert_valid_routing` against MoBA's own gates. Causality: a query's routing must not change when
keys from its own block on (and, for the causal variants, later queries) change.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moba_edu import variants as V
from moba_edu.efficient import attention_given_routing
from moba_edu.routing import indices_to_mask, route_indices
from reference import assert_valid_routing, reference_moba
from strategies import cases, rel_err


def each_head(case, indices, q, k, check):
    g = case.Hq // case.Hkv
    for b in range(case.B):
        for h in range(case.Hq):
            check(indices[b, h], q[b, h], k[b, h // g])


def assert_top_k(indices, scores64, block_size, top_k, start=None):
    """indices int64 [S, K] of one head is own block + a top-(top_k - 1) of scores64 float64 [S, N] among
    the blocks j < start // block_size (start: the first position whose keys may not be used, default
    each query t itself), up to float32 rounding."""
    S, N = scores64.shape
    t = torch.arange(S)
    own = t // block_size
    limit = own if start is None else start // block_size
    assert torch.equal(indices[:, 0], own), "own block not first"
    routed = indices[:, 1:]
    assert ((routed < limit[:, None]) & (routed >= -1)).all(), "a routed block is not eligible"
    mask = indices_to_mask(routed, N)
    assert torch.equal(mask.sum(1), limit.clamp(max=top_k - 1)), "wrong number of routed blocks"
    eligible = torch.arange(N)[None, :] < limit[:, None]
    slack = 1e-5 * (1 + scores64.abs().amax())
    worst = torch.where(mask, scores64, math.inf).min(1).values
    best_left = torch.where(eligible & ~mask, scores64, -math.inf).max(1).values
    assert (worst + slack >= best_left).all(), "an unchosen block clearly beats a chosen one"


@given(cases())
def test_moba_variant_is_the_router(case):
    q, k, _ = case.tensors()
    each_head(case, V.moba(q, k, block_size=case.block_size, top_k=case.top_k), q, k,
              lambda idx, qh, kh: assert_valid_routing(idx[:, 1:], qh, kh, case.block_size, case.top_k))


@given(cases())
def test_identity_convolution_is_moba(case):
    q, k, _ = case.tensors()
    identity = torch.tensor([0.0, 0.0, 1.0])
    idx = V.key_conv(q, k, block_size=case.block_size, top_k=case.top_k, weight=identity)
    each_head(case, idx, q, k, lambda i, qh, kh: assert_valid_routing(i[:, 1:], qh, kh, case.block_size, case.top_k))


def conv64(k, weight):
    """Reference causal conv of one head's keys k [S, D] in float64, by a loop over positions."""
    W = len(weight)
    out = torch.zeros(k.shape, dtype=torch.float64)
    for s in range(k.shape[0]):
        for i in range(W):
            if s - (W - 1) + i >= 0:
                out[s] += float(weight[i]) * k[s - (W - 1) + i].double()
    return out


def block_reps64(k, block_size, pool):
    blocks = [k[j:j + block_size].double() for j in range(0, k.shape[0], block_size)]
    return torch.stack([b.amax(0) if pool == "max" else b.mean(0) for b in blocks])


@given(cases(max_s=32), st.lists(st.floats(-2, 2), min_size=1, max_size=4))
def test_key_conv_routes_by_the_convolved_means(case, taps):
    q, k, _ = case.tensors()
    weight = torch.tensor(taps)
    idx = V.key_conv(q, k, block_size=case.block_size, top_k=case.top_k, weight=weight)
    each_head(case, idx, q, k, lambda i, qh, kh: assert_top_k(
        i, qh.double() @ block_reps64(conv64(kh, weight), case.block_size, "mean").T, case.block_size, case.top_k))


@given(cases())
def test_max_pooled_routes_by_the_block_max(case):
    q, k, _ = case.tensors()
    idx = V.max_pooled(q, k, block_size=case.block_size, top_k=case.top_k)
    each_head(case, idx, q, k, lambda i, qh, kh: assert_top_k(
        i, qh.double() @ block_reps64(kh, case.block_size, "max").T, case.block_size, case.top_k))


@given(cases())
def test_max_pooled_with_blocks_of_one_key_is_moba(case):
    q, k, _ = case.tensors()
    idx = V.max_pooled(q, k, block_size=1, top_k=case.top_k)
    each_head(case, idx, q, k, lambda i, qh, kh: assert_valid_routing(i[:, 1:], qh, kh, 1, case.top_k))


@given(cases(), st.sampled_from(["mean", "first"]))
def test_tile_of_one_query_is_moba(case, by):
    q, k, _ = case.tensors()
    idx = V.tile_shared(q, k, block_size=case.block_size, top_k=case.top_k, tile_size=1, by=by)
    each_head(case, idx, q, k, lambda i, qh, kh: assert_valid_routing(i[:, 1:], qh, kh, case.block_size, case.top_k))


@given(cases(), st.integers(1, 12), st.sampled_from(["mean", "first"]))
def test_tile_shared_routes_each_tile_by_its_query(case, tile_size, by):
    q, k, _ = case.tensors()
    idx = V.tile_shared(q, k, block_size=case.block_size, top_k=case.top_k, tile_size=tile_size, by=by)
    S = case.S
    first = torch.arange(S) // tile_size * tile_size

    def check(i, qh, kh):
        tiles = [qh[s:s + tile_size].double() for s in range(0, S, tile_size)]
        tq = torch.stack([t.mean(0) if by == "mean" else t[0] for t in tiles])[torch.arange(S) // tile_size]
        scores = tq @ block_reps64(kh, case.block_size, "mean").T
        assert_top_k(i, scores, case.block_size, case.top_k, start=first)
        same_tile = first[1:] == first[:-1]  # one routed set per tile
        routed = i[:, 1:].sort(-1).values
        assert torch.equal(routed[1:][same_tile], routed[:-1][same_tile])

    each_head(case, idx, q, k, check)


def routers():
    indexer = V.LightningIndexer(16, heads=2, dim=4, seed=1)
    return {
        "moba": lambda q, k: V.moba(q, k, block_size=4, top_k=3),
        "key_conv": lambda q, k: V.key_conv(q, k, block_size=4, top_k=3, weight=torch.tensor([0.5, -1.0, 1.0])),
        "max_pooled": lambda q, k: V.max_pooled(q, k, block_size=4, top_k=3),
        "tile_first": lambda q, k: V.tile_shared(q, k, block_size=4, top_k=3, tile_size=8, by="first"),
        "indexer": lambda q, k: V.indexer_indices(indexer, q, k, top_k=5),
    }


@pytest.mark.parametrize("name", list(routers()))
@pytest.mark.parametrize("t", [5, 13, 22, 31])
def test_routing_ignores_the_future(name, t):
    """Query t's routing is unchanged when every key from its own block on, and every later query, changes."""
    route = routers()[name]
    gen = torch.Generator().manual_seed(t)
    q, k = torch.randn(2, 1, 2, 32, 16, generator=gen).unbind(0)
    block = 1 if name == "indexer" else 4
    first_unseen = t // block * block  # keys from the query's own block on: not routable
    q2, k2 = q.clone(), k.clone()
    q2[:, :, t + 1:] = torch.randn(q2[:, :, t + 1:].shape, generator=gen)
    k2[:, :, first_unseen:] = torch.randn(k2[:, :, first_unseen:].shape, generator=gen)
    assert torch.equal(route(q, k)[:, :, t], route(q2, k2)[:, :, t])


def test_tile_mean_reads_later_queries():
    """The documented caveat of by="mean": a later query of the tile can change an earlier one's routing."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 32, 8, generator=gen).unbind(0)
    base = V.tile_shared(q, k, block_size=4, top_k=2, tile_size=8, by="mean")[0, 0, 24]
    changed = set()
    for trial in range(20):
        q2 = q.clone()
        q2[:, :, 25:32] = 10 * torch.randn(1, 1, 7, 8, generator=gen)
        changed.add(int(V.tile_shared(q2, k, block_size=4, top_k=2, tile_size=8, by="mean")[0, 0, 24, 1]))
    assert changed - {int(base[1])}


@given(cases())
def test_attention_given_moba_routing_is_moba(case):
    q, k, v = case.tensors(dtype=torch.float64)
    idx = route_indices(q, k, block_size=case.block_size, top_k=case.top_k)
    o, lse = attention_given_routing(q, k, v, idx, case.block_size)
    o_ref, lse_ref = reference_moba(q, k, v, case.block_size, case.top_k)
    assert rel_err(o, o_ref) < 1e-10 and rel_err(lse, lse_ref) < 1e-10


def dense_given_routing(q, k, v, idx, block_size):
    """float64 attention under the token mask of a routing [B, Hq, S, K] (independent of the torch rung)."""
    S, D = q.shape[-2:]
    g = q.shape[1] // k.shape[1]
    mask = indices_to_mask(idx, -(-S // block_size))[..., torch.arange(S) // block_size]
    mask &= torch.ones(S, S, dtype=torch.bool).tril()
    scores = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) / math.sqrt(D)
    return scores.masked_fill(~mask, -math.inf).softmax(-1) @ v.double().repeat_interleave(g, 1)


@given(cases(), st.integers(1, 6))
def test_attention_given_a_variant_routing_is_exact(case, tile_size):
    q, k, v = case.tensors()
    idx = V.tile_shared(q, k, block_size=case.block_size, top_k=case.top_k, tile_size=tile_size)
    o, _ = attention_given_routing(q, k, v, idx, case.block_size)
    assert rel_err(o, dense_given_routing(q, k, v, idx, case.block_size)) < 1e-5


def test_attention_given_routing_refuses_bad_indices():
    q = k = v = torch.randn(1, 1, 16, 8)
    idx = route_indices(q, k, block_size=4, top_k=3)
    with pytest.raises(TypeError, match="indices must be an int64"):
        attention_given_routing(q, k, v, idx.int(), 4)
    with pytest.raises(ValueError, match="shape"):
        attention_given_routing(q, k, v, idx[:, :, :8], 4)
    future = idx.clone()
    future[0, 0, 5, 1] = 1  # query 5 sits in block 1: its own block routed again
    with pytest.raises(ValueError, match="wholly before the own block"):
        attention_given_routing(q, k, v, future, 4)
    wrong_own = idx.clone()
    wrong_own[0, 0, 9, 0] = 0
    with pytest.raises(ValueError, match="own block"):
        attention_given_routing(q, k, v, wrong_own, 4)
    twice = idx.clone()
    twice[0, 0, 15, 1:] = 0
    with pytest.raises(ValueError, match="same block twice"):
        attention_given_routing(q, k, v, twice, 4)


def test_bad_variant_arguments_are_named():
    q = k = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match="tile_size"):
        V.tile_shared(q, k, block_size=4, top_k=2, tile_size=0)
    with pytest.raises(ValueError, match="by must be"):
        V.tile_shared(q, k, block_size=4, top_k=2, tile_size=2, by="union")
    with pytest.raises(ValueError, match="weight"):
        V.key_conv(q, k, block_size=4, top_k=2, weight=torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="block_size"):
        V.max_pooled(q, k, block_size=0, top_k=2)


def test_indexer_learns_full_attention_and_routes_by_its_scores():
    """A few Adam steps on the KL to full attention cut the loss; routing is top-k of the index scores."""
    from moba_edu.viz import attention_probs
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(1, 2, 4, 16, generator=gen).repeat_interleave(8, dim=2)  # 4 topics of 8 tokens
    q, k = base + 0.3 * torch.randn(2, 1, 2, 32, 16, generator=gen)
    indexer = V.LightningIndexer(16, heads=2, dim=4, seed=0)
    losses = V.train_indexer(indexer, [(q, k, attention_probs(q, k))], steps=60, lr=2e-2)
    assert losses[-1] < 0.5 * losses[0]
    idx = V.indexer_indices(indexer, q, k, top_k=6)
    with torch.no_grad():
        scores = indexer(q, k).double()
    for h in range(2):
        assert_top_k(idx[0, h], scores[0, h], 1, 6)


def test_causal_key_conv_matches_a_loop_and_is_differentiable():
    gen = torch.Generator().manual_seed(4)
    k = torch.randn(1, 2, 9, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)  # per channel
    out = V.causal_key_conv(k, weight)
    for h in range(2):
        for d in range(3):
            ref = conv64(k[0, h, :, d:d + 1].detach(), weight[h, d].detach())[:, 0]
            assert rel_err(out[0, h, :, d], ref) < 1e-12
    assert torch.autograd.gradcheck(lambda a, b: V.causal_key_conv(a, b), (k, weight))


def test_model_key_conv_starts_as_the_plain_model_and_stays_causal():
    """ModelConfig(key_conv=3): identity-initialised, so the untrained model equals the one without it;
    after perturbing the kernel, the logits at t still ignore tokens after t."""
    from moba_edu.model import Model, ModelConfig
    tokens = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    make = lambda conv: Model(ModelConfig(block_size=8, top_k=2, impl="torch", key_conv=conv))  # noqa: E731
    torch.manual_seed(0)
    plain = make(0)
    torch.manual_seed(0)
    conv = make(3)
    assert rel_err(conv(tokens), plain(tokens)) < 1e-5
    with torch.no_grad():
        for block in conv.blocks:
            block.attn.kconv.add_(0.3 * torch.randn(block.attn.kconv.shape))
    changed = tokens.clone()
    changed[0, 30:] = (changed[0, 30:] + 1) % 256
    assert rel_err(conv(changed)[0, :30], conv(tokens)[0, :30]) < 1e-6
    assert rel_err(conv(changed)[0, 30:], conv(tokens)[0, 30:]) > 1e-3


def test_train_cli_overrides_block_top_k_and_key_conv(tmp_path):
    import json

    from moba_edu.train import main
    main(["--config", "tiny", "--steps", "2", "--batch", "2", "--block-size", "16", "--top-k", "4", "--key-conv", "3",
          "--no-ckpt", "--no-progress", "--out", str(tmp_path)])
    log = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert log["config"]["name"] == "tiny-moba-b16-k4-conv3"
    model = log["config"]["model"]
    assert (model["block_size"], model["top_k"], model["key_conv"]) == (16, 4, 3)
