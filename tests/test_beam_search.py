"""Beam search in the engine: equal to transformers' beam search, and its block sharing."""

from __future__ import annotations

import pytest
import torch

from quire import BeamSearchParams

WIDTH = 4
NEW_TOKENS = 32
PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "List three colours of the rainbow:\n1.",
    "Question: What is 12 times 12?\nAnswer:",
    "PagedAttention stores the key and value cache of a transformer in fixed-size blocks because",
]


def _hf_beams(hf_model, prompt: list[int], eos: int):
    out = hf_model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        num_beams=WIDTH,
        num_return_sequences=WIDTH,
        length_penalty=1.0,
        early_stopping=False,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=eos,
        pad_token_id=eos,
        output_scores=True,
        return_dict_in_generate=True,
        repetition_penalty=1.0,
        top_k=None,
        top_p=None,
        temperature=None,
    )
    beams = []
    for row, score in zip(out.sequences.tolist(), out.sequences_scores.tolist(), strict=True):
        generated = row[len(prompt) :]
        if eos in generated:  # the rest is padding
            generated = generated[: generated.index(eos) + 1]
        beams.append((generated, score))
    return beams


@pytest.mark.slow
def test_beam_search_equals_transformers(llm_fp32, hf_model, tokenizer):
    eos = llm_fp32.engine.eos_token_id
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    outputs = llm_fp32.beam_search(
        [{"prompt_token_ids": p} for p in prompts], BeamSearchParams(beam_width=WIDTH, max_tokens=NEW_TOKENS)
    )
    assert llm_fp32.stats()["num_free_kv_blocks"] == llm_fp32.stats()["num_kv_blocks"]
    for prompt, output in zip(prompts, outputs, strict=True):
        expected = _hf_beams(hf_model, prompt, eos)
        got = [(s.output_tokens, s.score) for s in output.sequences]
        assert [g[0] for g in got] == [e[0] for e in expected], (tokenizer.decode(prompt), got, expected)
        for (_, score), (_, ref) in zip(got, expected, strict=True):
            assert score == pytest.approx(ref, abs=1e-3)
