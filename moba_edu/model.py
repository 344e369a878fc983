"""A small decoder-only transformer (in the spirit of Karpathy's nanoGPT) whose attention is chosen per
layer: "full" (causal SDPA), "moba" (`moba_edu.moba_attention`; impl="auto" takes the Triton kernels
on a GPU and the torch rung on a CPU) or "dsa" (token-level top-k by a learned lightning indexer, as in
DeepSeek-V3.2's sparse attention, at MoBA's number of attended keys, block_size * top_k). Grouped-query
heads, rotary position embeddings (RoPE, Su et al., 2021), RMSNorm, a SwiGLU MLP, tied input/output
embeddings. Contract: docs/design.md §2b.

A hybrid model, MoBA in every layer but the last `L` (as the MoBA paper trains), is one line:
`ModelConfig(..., layers=hybrid_pattern(n_layer, L))`. `Model.set_layers(pattern)` swaps the attention of
every layer without touching a weight (MoBA and full attention have the same parameters), which is
how the training loop switches from MoBA to full attention (or back) part-way through a run.

Shapes: tokens [B, S] int64 -> logits [B, S, vocab] float32; inside a layer x [B, S, d_model],
q [B, Hq, S, Dh], k and v [B, Hkv, S, Dh].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .api import moba_attention
from .checks.grading import exercise
from .quality import attention_probs
from .routing import indices_to_mask
from .variants import LightningIndexer, causal_key_conv, indexer_loss, select

KINDS = ("full", "moba", "dsa")


@exercise("nb08.check_hybrid_pattern")
def hybrid_pattern(n_layer: int, last_full: int) -> tuple[str, ...]:
    """MoBA in the first `n_layer - last_full` layers, full attention in the last `last_full`."""
    if not 0 <= last_full <= n_layer:
        raise ValueError(f"last_full: expected 0..{n_layer}, got {last_full}")
    return ("moba",) * (n_layer - last_full) + ("full",) * last_full


@dataclass
class ModelConfig:
    """vocab: 256 for bytes; layers: one of KINDS per layer (its length is the depth)."""

    layers: tuple[str, ...] = ("moba", "moba")
    vocab: int = 256
    d_model: int = 64
    n_head: int = 4
    n_kv_head: int = 2
    block_size: int = 32          # MoBA's key block, in tokens
    top_k: int = 3                # MoBA blocks per query, own block included
    rope_base: float = 10000.0
    impl: str = "auto"            # MoBA rung
    key_conv: int = 0             # kernel size of a causal depthwise convolution over the keys (0: none)
    mlp_mult: int = 4
    index_heads: int | None = None  # lightning indexer heads per layer (None: 4 with a "dsa" layer, else 0)
    index_dim: int = 16             # dimensions per indexer head

    def __post_init__(self):
        self.layers = tuple(self.layers)
        check_layers(self.layers)
        if self.index_heads is None:
            self.index_heads = 4 if "dsa" in self.layers else 0
        if self.d_model % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_head: d_model ({self.d_model}) must divide by n_head ({self.n_head}) "
                             f"and n_head by n_kv_head ({self.n_kv_head})")


def check_layers(layers) -> None:
    bad = [kind for kind in layers if kind not in KINDS]
    if not layers or bad:
        raise ValueError(f"layers: expected a non-empty sequence of {KINDS}, got {tuple(layers)}")


def rope_tables(S: int, head_dim: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin float32 [S, head_dim // 2]: angle t / base^(2i / head_dim) for position t, pair i."""
    inv = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(S, device=device, dtype=torch.float32)[:, None] * inv
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (first half, second half) pair of x [B, H, S, Dh] by its angle; dtype kept."""
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str, layer: int = 0):
        super().__init__()
        self.cfg, self.kind = cfg, kind
        self.head_dim = cfg.d_model // cfg.n_head
        kv = cfg.n_kv_head * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * kv, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.keep_qk = False      # set by the trainer to measure router recall on this layer
        if cfg.key_conv:          # FlashMoBA's key convolution, one kernel per channel, initialised to identity
            self.kconv = nn.Parameter(F.one_hot(torch.full((cfg.n_kv_head, self.head_dim), cfg.key_conv - 1),
                                                cfg.key_conv).float())
        if cfg.index_heads:       # in every layer, so that set_layers can switch any layer to "dsa"
            self.indexer = LightningIndexer(self.head_dim, heads=cfg.index_heads, dim=cfg.index_dim, seed=layer)
        self.last_qk = None
        self.index_loss = None    # the indexer's KL to full attention, set by a training forward

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self.qkv(x).split([self.cfg.d_model, *2 * [self.cfg.n_kv_head * self.head_dim]], dim=-1)
        q = q.view(B, S, self.cfg.n_head, self.head_dim).transpose(1, 2)       # [B, Hq, S, Dh]
        k = k.view(B, S, self.cfg.n_kv_head, self.head_dim).transpose(1, 2)    # [B, Hkv, S, Dh]
        v = v.view(B, S, self.cfg.n_kv_head, self.head_dim).transpose(1, 2)
        if self.cfg.key_conv:     # keys mix in their key_conv - 1 predecessors (causal), for routing and attention
            k = causal_key_conv(k, self.kconv).to(v.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # MoBA routes on the rotated q and k
        if self.keep_qk:
            self.last_qk = (q.detach(), k.detach())
        fit = self.training and hasattr(self, "indexer")  # also under "full": DSA's dense warm-up
        self.index_loss = self.fit_indexer(q[:1].detach(), k[:1].detach()) if fit else None
        if self.kind == "full":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif self.kind == "dsa":
            g = self.cfg.n_head // self.cfg.n_kv_head   # heads repeated: masked SDPA keeps its fused kernels
            o = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                               attn_mask=self.chosen_tokens(q, k))
        else:
            o = moba_attention(q, k, v, block_size=self.cfg.block_size, top_k=self.cfg.top_k, impl=self.cfg.impl)
        return self.out(o.transpose(1, 2).reshape(B, S, -1))

    def chosen_tokens(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The keys a "dsa" layer attends: bool [B, Hq, S, S], each query's own token plus the
        block_size * top_k - 1 earlier tokens the indexer scores highest (all earlier ones while fewer)."""
        with torch.no_grad():
            scores = self.indexer(q, k)
        return indices_to_mask(select(scores, 1, self.cfg.block_size * self.cfg.top_k), q.shape[-2])

    def fit_indexer(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The indexer's loss on detached q [b, Hq, S, Dh], k [b, Hkv, S, Dh]: KL from the layer's full causal
        attention to the indexer's softmax (`variants.indexer_loss`); its gradient reaches the indexer only."""
        with torch.autocast(q.device.type, enabled=False):
            return indexer_loss(self.indexer(q.float(), k.float()), attention_probs(q, k))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, kind: str, layer: int = 0):
        super().__init__()
        hidden = cfg.mlp_mult * cfg.d_model * 2 // 3  # SwiGLU: about as many weights as a 4x GELU MLP
        self.norm1, self.norm2 = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg, kind, layer)
        self.gate_up = nn.Linear(cfg.d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, kind, i) for i, kind in enumerate(cfg.layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.apply(self._init)

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(block.attn.kind for block in self.blocks)

    def set_layers(self, layers) -> None:
        """Give layer i the attention layers[i] (one of KINDS); the weights stay as they are. "dsa" needs
        the indexers of a model built with index_heads > 0 (the default when a layer is "dsa")."""
        layers = tuple(layers)
        check_layers(layers)
        if len(layers) != len(self.blocks):
            raise ValueError(f"layers: expected {len(self.blocks)} kinds, got {len(layers)}")
        if "dsa" in layers and not self.cfg.index_heads:
            raise ValueError("layers: 'dsa' needs a lightning indexer per layer: build with ModelConfig(index_heads=4)")
        for block, kind in zip(self.blocks, layers):
            block.attn.kind = kind

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens int64 [B, S] -> logits float32 [B, S, vocab] (position t predicts token t + 1)."""
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens: expected int64 [B, S], got {tokens.dtype} {tuple(tokens.shape)}")
        cos, sin = rope_tables(tokens.shape[1], self.cfg.d_model // self.cfg.n_head, self.cfg.rope_base,
                               tokens.device)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        return F.linear(self.norm(x), self.embed.weight).float()  # tied output embedding

    def index_loss(self) -> torch.Tensor | None:
        """The sum of the indexers' losses of the last training forward (None without indexers)."""
        losses = [block.attn.index_loss for block in self.blocks if block.attn.index_loss is not None]
        return sum(losses) if losses else None
