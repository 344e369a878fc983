"""MoBA in Hugging Face transformers: an attention implementation and a cache for generate()
(docs/design.md §2a). transformers is an optional extra (`pip install moba-edu[hf]`); `import moba_edu`
does not import it, this module does.

    import moba_edu.hf                       # registers attn_implementation="moba"
    config.moba_block_size, config.moba_top_k = 64, 4
    model = AutoModelForCausalLM.from_config(config, attn_implementation="moba")
    cache = moba_edu.hf.MobaCache(config, max_seqlen=4096)
    model.generate(input_ids, past_key_values=cache, max_new_tokens=100)

Attention. transformers looks attention up by name (`AttentionInterface`); "moba" is
`moba_attention_forward`, called by every model written against that interface with q [B, Hq, s, D]
and the k, v its cache returned. Without a cache (training, a plain forward) it is `moba_attention` over
the sequence, differentiable. With a `MobaCache` it is `moba_decode` over the layer's paged
`MobaKVCache`: the prefill (nothing cached before) runs the forward rung on the prompt, and each
generated token routes from the cached page means and reads top_k pages. The block size and top_k come
from the model config's `moba_block_size` and `moba_top_k`.

Cache. `MobaCache` is a transformers `Cache` whose layers (`MobaCacheLayer`) append the new keys and
values to a `MobaKVCache` and return the *new* k and v tagged with that cache (attribute `moba_cache`):
transformers' attention layers hand k and v straight to the attention function, which finds the cache on
them. (The cache cannot be passed by transformers: the attention interface receives only q, k, v,
the mask and keyword settings.)

Limits: no padding mask (transformers builds no mask for an implementation it does not know, so a
padded batch would attend its pad tokens: give sequences of one length, or batch size 1); greedy or
sampled decoding, no beam search (the cache cannot reorder its batch).
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from .api import moba_attention
from .decode import MobaKVCache, moba_decode


def moba_settings(config) -> tuple[int, int]:
    """(block_size, top_k) from a transformers config's `moba_block_size` and `moba_top_k`."""
    try:
        return config.moba_block_size, config.moba_top_k
    except AttributeError:
        raise ValueError("config must set moba_block_size and moba_top_k to use attn_implementation='moba'") from None


def moba_attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention signature: query [B, Hq, s, D], key, value [B, Hkv, s', D] ->
    (out [B, s, Hq, D], None). attention_mask is not used (causal MoBA; see the module's limits)."""
    if dropout:
        raise ValueError(f"dropout: attn_implementation='moba' has no attention dropout, got {dropout}")
    block_size, top_k = moba_settings(module.config)
    cache = getattr(key, "moba_cache", None)
    if cache is not None:
        out = moba_decode(query, cache, top_k=top_k, scale=scaling)
    elif key.shape[2] != query.shape[2]:
        raise ValueError(f"key holds {key.shape[2]} positions for {query.shape[2]} queries: decoding with "
                         "attn_implementation='moba' needs past_key_values=moba_edu.hf.MobaCache(config, ...)")
    else:
        out = moba_attention(query, key, value, block_size=block_size, top_k=top_k, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


class MobaCacheLayer(CacheLayerMixin):
    """One layer's cache: a MobaKVCache made at the first update from the keys' batch, heads, dtype and device."""

    is_sliding = False

    def __init__(self, block_size: int, max_seqlen: int):
        super().__init__()
        self.block_size, self.max_seqlen = block_size, max_seqlen
        self.moba: MobaKVCache | None = None

    def lazy_initialization(self, key_states, value_states) -> None:
        B, H, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.moba = MobaKVCache(B, H, D, block_size=self.block_size, max_seqlen=self.max_seqlen,
                                dtype=key_states.dtype, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Append key_states, value_states [B, Hkv, s, D]; return them, k tagged with the cache."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.moba.append(key_states, value_states)
        key_states = key_states.view_as(key_states)      # a new tensor object to carry the tag
        key_states.moba_cache = self.moba
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return int(self.moba.seqlens.max()) if self.moba is not None else 0

    def get_max_length(self) -> int:
        return self.max_seqlen

    def reset(self) -> None:
        self.moba, self.is_initialized = None, False

    def _cannot(self, what: str) -> None:
        if self.moba is not None and int(self.moba.seqlens.max()) > 0:
            raise NotImplementedError(f"MobaCache cannot {what} (beam search, assisted or contrastive decoding): "
                                      "use greedy or sampled generation")

    def reorder_cache(self, beam_idx) -> None:
        self._cannot("reorder its batch")

    def crop(self, tokens_to_remove: int) -> None:
        self._cannot("drop tokens")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._cannot("repeat its batch")

    def batch_select_indices(self, indices) -> None:
        self._cannot("select from its batch")


class MobaCache(Cache):
    """A transformers Cache of MobaKVCache layers: config (with moba_block_size, moba_top_k) of the model;
    max_seqlen the most tokens a sequence will hold (prompt + generated)."""

    def __init__(self, config, max_seqlen: int):
        block_size, _ = moba_settings(config)
        n_layers = config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[MobaCacheLayer(block_size, max_seqlen) for _ in range(n_layers)])


AttentionInterface.register("moba", moba_attention_forward)
