"""Shared fixtures: the real default model (Quire and transformers) and a tiny random Llama, built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_model_path() -> str:
    from quire.models.loader import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def llm_fp32():
    """The embedded default model in float32, the dtype the fidelity bar is defined for."""
    from quire import LLM

    return LLM(dtype="float32", seed=0)


@pytest.fixture(scope="session")
def tokenizer(llm_fp32):
    return llm_fp32.get_tokenizer()


@pytest.fixture(scope="session")
def hf_model(default_model_path):
    """transformers' own Llama on the same GGUF weights: the reference implementation."""
    from transformers import AutoModelForCausalLM

    path = Path(default_model_path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> str:
    """A small random Llama saved with save_pretrained (safetensors + config + tokenizer files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)
