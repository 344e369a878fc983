"""What the training loop measures (docs/design.md §2b): losses per position, the trailing-token loss,
retrieval accuracy by distance, and router recall against the oracle (`moba_edu.quality`).

Shapes: tokens int64 [B, S + 1]; losses float32 [B, S] (position t: the loss of predicting token t + 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks.grading import exercise
from .quality import attention_probs, recall_curve, token_recall


def token_losses(model, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every next-token prediction: tokens [B, S + 1] -> float32 [B, S]."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")


@exercise("nb08.check_trailing_loss")
def trailing_loss(losses: torch.Tensor, last: int) -> float:
    """Mean loss of the last `last` positions of every sequence: losses [B, S] -> float. The tokens that
    have the most context before them, where long-range attention can help most."""
    if not 1 <= last <= losses.shape[-1]:
        raise ValueError(f"last: expected 1..{losses.shape[-1]}, got {last}")
    return losses[:, -last:].mean().item()


def loss_by_position(losses: torch.Tensor, bins: int) -> list[float]:
    """Mean loss over `bins` equal slices of the positions: losses [B, S] -> `bins` floats, earliest first."""
    return [chunk.mean().item() for chunk in losses.chunk(bins, dim=-1)]


def retrieval_accuracy(model, tokens: torch.Tensor, answer: torch.Tensor) -> float:
    """Share of asked values predicted right (argmax): tokens [B, S + 1], answer bool [B, S] -> float."""
    logits = model(tokens[:, :-1])
    right = logits.argmax(-1) == tokens[:, 1:]
    return right[answer].float().mean().item()


def capture_qk(model, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The rotated q [B, Hq, S, Dh] and k [B, Hkv, S, Dh] of every layer on tokens [B, S]."""
    attns = [block.attn for block in model.blocks]
    for attn in attns:
        attn.keep_qk = True
    try:
        model(tokens)
        return [attn.last_qk for attn in attns]
    finally:
        for attn in attns:
            attn.keep_qk, attn.last_qk = False, None


def router_recall(model, tokens: torch.Tensor, block_size: int, top_k: int) -> list[float]:
    """Per layer, the attention mass MoBA's router keeps over what the oracle keeps with the same top_k
    (1 = as good as the oracle), on tokens [B, S]. A full-attention layer is scored on what the
    router would choose there; a "dsa" layer on its indexer's block_size * top_k tokens against the
    token oracle (`quality.token_recall`). Mean over the queries from block top_k on, the first that
    have more eligible blocks than they may route to (earlier queries keep everything); all queries when
    top_k covers every block (then the recall is 1)."""
    first = top_k * block_size if top_k * block_size < tokens.shape[-1] else 0
    recalls = []
    for block, (q, k) in zip(model.blocks, capture_qk(model, tokens)):
        if block.attn.kind == "dsa":
            with torch.no_grad():
                scores = block.attn.indexer(q, k)
            recalls.append(token_recall(attention_probs(q, k), scores, block_size * top_k, slice(first, None)))
        else:
            curve = recall_curve(q, k, block_size, queries=slice(first, None))
            recalls.append(curve.recall[min(top_k, len(curve.recall)) - 1])
    return recalls
