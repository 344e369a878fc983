"""The transformers integration (moba_edu/hf.py) on a tiny randomly initialised Llama built here (no
downloads): with top_k >= the number of blocks, logits equal SDPA's and greedy generations are
identical; with a small top_k, every generated step's logits equal a full MoBA forward over the
sequence so far (prefill + paged decoding = the full forward, docs/design.md §2a)."""

import copy
import subprocess
import sys

import pytest
import torch

import transformers

import moba_edu.hf as mh

PROMPT = 21


def tiny_llama(attn_implementation, block_size=4, top_k=2, seed=0):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config.moba_block_size, config.moba_top_k = block_size, top_k
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(copy.deepcopy(config)).eval()
    weights = model.state_dict()
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation).eval()
    model.load_state_dict(weights)
    return model


def prompt(batch=2, seed=1):
    return torch.randint(0, 64, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, new_tokens, **kw):
    if model.config._attn_implementation == "moba":
        kw["past_key_values"] = mh.MobaCache(model.config, max_seqlen=ids.shape[1] + new_tokens)
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0, **kw)


def test_full_top_k_is_sdpa():
    sdpa, moba = tiny_llama("sdpa"), tiny_llama("moba", top_k=100)
    ids = prompt()
    with torch.no_grad():
        torch.testing.assert_close(moba(ids).logits, sdpa(ids).logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(generate(moba, ids, 12), generate(sdpa, ids, 12))   # the same tokens, greedy


@pytest.mark.parametrize("block_size,top_k", [(4, 1), (4, 2), (3, 3)])
def test_generated_logits_equal_the_full_moba_forward(block_size, top_k):
    moba = tiny_llama("moba", block_size=block_size, top_k=top_k)
    ids = prompt()
    out = generate(moba, ids, 10, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        sdpa_last = tiny_llama("sdpa")(out.sequences[:, :-1]).logits[:, -1]
        for step, logits in enumerate(out.logits):
            full = moba(out.sequences[:, :PROMPT + step]).logits[:, -1]    # no cache: moba_attention
            torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
    assert (sdpa_last - out.logits[-1]).abs().max() > 1e-3, "small top_k should differ from dense attention"


def test_forward_without_cache_is_differentiable():
    moba = tiny_llama("moba").train()
    moba(prompt(), labels=prompt()).loss.backward()
    assert moba.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_errors_name_what_is_missing():
    moba = tiny_llama("moba")
    del moba.config.moba_top_k
    with pytest.raises(ValueError, match="moba_block_size and moba_top_k"):
        moba(prompt())
    moba = tiny_llama("moba")
    with pytest.raises(ValueError, match="past_key_values=moba_edu.hf.MobaCache"):
        moba.generate(prompt(1), max_new_tokens=2, do_sample=False, pad_token_id=0)   # a DynamicCache


def test_beam_search_is_refused_by_name():
    moba = tiny_llama("moba")
    with pytest.raises(NotImplementedError, match="MobaCache cannot reorder its batch"):
        generate(moba, prompt(1), 4, num_beams=2)


def test_import_moba_edu_does_not_import_transformers():
    code = "import sys, moba_edu; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
