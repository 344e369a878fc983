"""The cost model of MoBA: attended pairs, density, FLOPs and bytes (pure arithmetic, no plotting).

Query t attends its own block causally (t mod block_size + 1 keys) plus min(top_k - 1, t // block_size)
whole earlier blocks, whatever the gates say, so the cost depends on S, block_size and top_k only.
Dense causal attention attends t + 1 keys. Per attended pair, attention costs 4·D FLOPs (2·D for
q·k and 2·D for p·v). The router adds the block means (S·D additions) and one 2·D dot product per
query and eligible block: quadratic in S too, but D·S²/block_size instead of D·S².

Used by `moba_edu.viz.cost` (plots), `moba_edu.checks.nb04` and the benchmarks (`moba_edu.bench`).
Counts from formulas are per head and sequence; `routed_pair_counts` counts what a router really chose.
"""

from __future__ import annotations

import torch

from .checks.grading import exercise
from .routing import num_blocks, own_block


def own_block_pairs(seq_len: int, block_size: int) -> int:
    """(query, key) pairs of the own blocks alone (causal inside the block): sum of t mod block_size + 1."""
    return int((torch.arange(seq_len) % block_size + 1).sum())


@exercise("nb00.check_causal_fraction", "nb04.check_attended_pairs")
def attended_pairs(seq_len: int, block_size: int, top_k: int) -> int:
    """(query, key) pairs MoBA attends; equals the True count of the token mask for any routing."""
    routed_blocks = int(own_block(seq_len, block_size).clamp(max=top_k - 1).sum())
    return own_block_pairs(seq_len, block_size) + block_size * routed_blocks


def dense_pairs(seq_len: int) -> int:
    """(query, key) pairs of dense causal attention: S (S + 1) / 2."""
    return seq_len * (seq_len + 1) // 2


def density(seq_len: int, block_size: int, top_k: int) -> float:
    """Fraction of the causal pairs MoBA attends (1 = dense)."""
    return attended_pairs(seq_len, block_size, top_k) / dense_pairs(seq_len)


def eligible_blocks(seq_len: int, block_size: int) -> int:
    """(query, block) pairs the router scores for one head: query t may route to blocks 0 .. t // block_size - 1."""
    return int(own_block(seq_len, block_size).sum())


def flops(seq_len: int, block_size: int, top_k: int, head_dim: int) -> dict[str, int]:
    """FLOPs of one head: {"dense", "moba_attention", "moba_router", "moba"}."""
    router = seq_len * head_dim + 2 * head_dim * eligible_blocks(seq_len, block_size)
    attention = 4 * head_dim * attended_pairs(seq_len, block_size, top_k)
    return {"dense": 4 * head_dim * dense_pairs(seq_len), "moba_attention": attention,
            "moba_router": router, "moba": attention + router}


def routed_pair_counts(routed: torch.Tensor, seq_len: int, block_size: int) -> dict:
    """What a router chose, counted over all heads of one sequence.

    routed: int [H, S, R], the routed (not own) blocks of every query, -1 where empty (any device).
    Returns own_pairs and routed_pairs ((query, key) pairs of the own and of the routed blocks),
    attended_pairs (their sum), routed_blocks ((query, block) selections), eligible_blocks ((query,
    block) pairs the router scored) and density (attended / causal pairs).
    """
    heads = routed.shape[0]
    routed_blocks = int((routed >= 0).sum())
    own = heads * float(own_block_pairs(seq_len, block_size))
    routed_pairs = float(routed_blocks * block_size)
    return {"own_pairs": own, "routed_pairs": routed_pairs, "attended_pairs": own + routed_pairs,
            "routed_blocks": routed_blocks, "eligible_blocks": heads * float(eligible_blocks(seq_len, block_size)),
            "density": (own + routed_pairs) / (heads * seq_len * (seq_len + 1) / 2)}


def router_cost(Hq: int, Hkv: int, S: int, D: int, R: int, eligible: float, itemsize: int = 2) -> dict:
    """The router's least work for one sequence: read q and k once, write R int32 indices per (head,
    query) (bytes); one 2·D float32 dot product per eligible (query, block) pair (FLOPs)."""
    return {"bytes": itemsize * S * D * (Hq + Hkv) + 4 * Hq * S * R, "flops": 2 * D * eligible}


def backward_cost(Hq: int, Hkv: int, S: int, D: int, own_pairs: float, routed_pairs: float,
                  itemsize: int = 2) -> dict:
    """The MoBA backward's work for one sequence.

    useful_flops: five [pair] x D matmuls per attended pair (S, dP, dV, dK, dQ), 2 FLOPs each.
    kernel_flops: what the kernels do: the own-block dQ is recomputed (+3 matmuls there), routed dQ
    is added by atomics (+1). min_bytes: read q, o, dO and k, v, write dQ, dK, dV (lse and Delta are
    small).
    """
    attended = own_pairs + routed_pairs
    return {"useful_flops": 10 * D * attended,
            "kernel_flops": 8 * D * attended + 2 * D * routed_pairs + 6 * D * own_pairs,
            "min_bytes": itemsize * D * S * (4 * Hq + 4 * Hkv)}


def naive_bytes(B: int, Hq: int, S: int, **_) -> int:
    """Peak extra memory of the naive rung's forward: 13 bytes per (head, query, key), float32.

    Alive together at its peak: the bool token mask (1 byte), the masked scores (4), scores minus
    their log-sum-exp (4) and its exponential (4).
    """
    return 13 * B * Hq * S * S


NAIVE_FORMULA = "13 B Hq S^2 bytes"
TORCH_FORMULA = ("4 B x [(block_size + 5 D) x rows + (2 Hq top_k + 4 Hkv) x B S D], "
                 "rows = Hq B S (top_k - 1) + Hkv B N block_size / 2")


def torch_bytes(B: int, Hq: int, Hkv: int, S: int, D: int, block_size: int, top_k: int) -> int:
    """Peak extra memory of the torch rung's forward (float32), reached in its routed step (top_k >= 2).

    `rows` query rows go through routed tiles: one per selection (Hq B S (top_k - 1), a little less
    since early queries have fewer eligible blocks) plus half a tile of padding per (kv head, block).
    Per row, alive at once: one row of scores/probabilities (block_size floats), the gathered query,
    key and value rows, and the tile output before and after normalisation (5 D floats; a tile has
    as many rows as keys). Besides: the partial outputs [T, Hq, top_k - 1, D] (zeros and filled),
    the own-block output, the packed copies of q, k, v and the key/value blocks gathered from them:
    (2 Hq top_k + 4 Hkv) B S D floats.
    The router's gate chunks (<= routing.GATE_BUDGET floats) are freed before attention starts.
    """
    N = num_blocks(S, block_size)
    rows = Hq * B * S * (top_k - 1) + Hkv * B * N * block_size / 2
    return int(4 * ((block_size + 5 * D) * rows + (2 * Hq * top_k + 4 * Hkv) * B * S * D))
