"""Greedy tokens and logprobs equal transformers' on the same weights, alone and batched."""

from __future__ import annotations

import pytest
import torch
from fidelity_utils import check_against_reference, fidelity_prompts

from quire import LLM

pytestmark = pytest.mark.slow


def test_default_model_matches_transformers(llm_fp32, hf_model, tokenizer):
    check_against_reference(llm_fp32, hf_model, fidelity_prompts(tokenizer))


def test_tiny_random_llama_matches_transformers(tiny_llama_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    llm = LLM(model=tiny_llama_dir, dtype="float32", block_size=8, max_num_batched_tokens=128)
    check_against_reference(llm, hf, fidelity_prompts(tokenizer))
