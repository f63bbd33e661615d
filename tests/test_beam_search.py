"""Beam search in the engine: equal to transformers' beam search, and its block sharing."""

from __future__ import annotations

import pytest
import torch

from quire import BeamSearchParams
from quire.sampling.beam_search import BeamSearch

WIDTH = 4
NEW_TOKENS = 32
PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "List three colours of the rainbow:\n1.",
    "Question: What is 12 times 12?\nAnswer:",
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


# -- the bookkeeping, without a model -------------------------------------------------------------

EOS = 0


def _search(width: int = 2, max_tokens: int = 10) -> BeamSearch:
    return BeamSearch(BeamSearchParams(beam_width=width, max_tokens=max_tokens), EOS, max_tokens)


def test_first_step_expands_the_prompt_into_the_best_candidates():
    search = _search()
    survivors = search.step([([], 0.0, [5, 6, 7, 8], [-0.1, -0.2, -0.3, -0.4])])
    assert [(c.parent, c.token_id) for c in survivors] == [(0, 5), (0, 6)]
    assert not search.done and search.num_generated == 1


def test_eos_among_the_top_k_finishes_a_hypothesis_with_length_counting_the_eos():
    search = _search()
    search.step([([], 0.0, [5, 6, 7, 8], [-0.1, -0.2, -0.3, -0.4])])
    survivors = search.step(
        [([5], -0.1, [EOS, 9, 3, 4], [-0.05, -1.0, -2.0, -3.0]), ([6], -0.2, [7, 8, 1, 2], [-0.5, -0.6, -4.0, -5.0])]
    )
    (hyp,) = search.finished
    assert hyp.token_ids == [5, EOS] and hyp.finish_reason == "stop"
    assert hyp.score == pytest.approx(-0.15 / 2)  # cum / generated length (EOS included) ** 1.0
    assert [(c.parent, c.token_id) for c in survivors] == [(1, 7), (1, 8)], "the finished beam does not continue"


def test_eos_ranked_beyond_the_top_k_is_dropped():
    search = _search()
    search.step([([], 0.0, [5, 6, 7, 8], [-0.1, -0.2, -0.3, -0.4])])
    search.step([([5], -0.1, [1, 2, EOS, 4], [-0.1, -0.2, -0.3, -3.0]), ([6], -0.2, [3, 4, 5, 6], [-2, -3, -4, -5])])
    assert search.finished == []


def test_search_ends_when_no_live_beam_can_beat_the_worst_hypothesis():
    search = _search(width=1)
    search.step([([], 0.0, [EOS, 5], [-0.1, -3.0])])
    assert search.finished[0].score == pytest.approx(-0.1)
    assert search.done, "-3.0 / 1 cannot beat -0.1"


def test_max_tokens_finishes_the_top_k_candidates():
    search = _search(width=2, max_tokens=1)
    assert search.step([([], 0.0, [5, 6, 7, 8], [-0.1, -0.2, -0.3, -0.4])]) == []
    assert search.done
    assert [(h.token_ids, h.finish_reason) for h in search.finished] == [([5], "length"), ([6], "length")]
