"""Every supported family, as a tiny random model saved with save_pretrained, matches transformers' greedy output.

The model class comes from config.json's ``architectures`` (the registry); each variant below
exercises what sets its family apart: q/k/v biases (Qwen2), per-head q/k RMSNorm (Qwen3), a
sliding window (Mistral), learned positions, LayerNorm, biases and ReLU (OPT, pre- and post-norm
with project_in/out), GELU and Conv1D weights (GPT-2).
"""

from __future__ import annotations

import pytest
import torch
from fidelity_utils import check_against_reference, fidelity_prompts

from quire import LLM
from quire.models.hf_config import PARSERS
from quire.models.registry import MODEL_CLASSES

pytestmark = pytest.mark.slow


def _configs(tokenizer) -> dict:
    import transformers as tf

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    vocab = len(tokenizer)
    rotary = {
        "vocab_size": vocab,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "initializer_range": 0.2,
        **ids,
    }
    opt = {
        "vocab_size": vocab,
        "hidden_size": 128,
        "ffn_dim": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 1024,
        "init_std": 0.2,
        "pad_token_id": 1,
        **ids,
    }
    return {
        "mistral": (tf.MistralConfig(**rotary, sliding_window=512), tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config(**rotary, tie_word_embeddings=True), tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config(**rotary, head_dim=48), tf.Qwen3ForCausalLM),
        "opt": (tf.OPTConfig(**opt), tf.OPTForCausalLM),
        "opt-postnorm-proj": (
            tf.OPTConfig(**opt, do_layer_norm_before=False, word_embed_proj_dim=64),
            tf.OPTForCausalLM,
        ),
        "gpt2": (
            tf.GPT2Config(
                vocab_size=vocab, n_embd=128, n_layer=2, n_head=4, n_positions=1024, initializer_range=0.2, **ids
            ),
            tf.GPT2LMHeadModel,
        ),
    }


FAMILIES = ["mistral", "qwen2", "qwen3", "opt", "opt-postnorm-proj", "gpt2"]


def test_registry_covers_every_parsed_architecture():
    assert set(PARSERS) == set(MODEL_CLASSES)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_matches_transformers(family, tokenizer, tmp_path):
    config, cls = _configs(tokenizer)[family]
    torch.manual_seed(1234)
    hf = cls(config).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    llm = LLM(model=str(tmp_path), dtype="float32", block_size=8, max_num_batched_tokens=128)
    assert type(llm.engine.model).__name__ == MODEL_CLASSES[cls.__name__].__name__
    prompts = fidelity_prompts(tokenizer)
    # Short, medium and the two longest (chunked at 128 tokens), plus the chat prompt: enough per family.
    check_against_reference(llm, hf, [prompts[i] for i in (0, 2, 5, 7, 8)])
