"""Hostile input to the offline API, generated: random SamplingParams and prompts with hypothesis.

Every combination, valid or not, is either served or refused with a ``ValueError`` that names
the field at fault; after each, the engine holds no request and every KV block is free, and it
goes on serving. Runs on the tiny random Llama with a short context, so serving is cheap.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quire import LLM, SamplingParams

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 24

# Per field: values that are valid alone, and values that are not (range, type, non-finite).
VALID = {
    "n": [1, 2, 3],
    "best_of": [None, 1, 2, 4],
    "temperature": [0.0, 0.7, 1.0, 50.0],
    "top_p": [1.0, 0.5, 0.01],
    "top_k": [0, -1, 1, 5, 10**6],
    "min_p": [0.0, 0.2, 1.0],
    "presence_penalty": [0.0, 1.5, -2.0],
    "frequency_penalty": [0.0, -1.0, 2.0],
    "repetition_penalty": [1.0, 1.3, 0.5],
    "seed": [None, 0, 7, -1, 2**63 - 1],
    "stop": [None, ".", ["a", "the"], ["\n"]],
    "stop_token_ids": [None, [0], [2, 3]],
    "ignore_eos": [False, True],
    "max_tokens": [None, 1, 4, 10**9],
    "min_tokens": [0, 2, 8],
    "logprobs": [None, 0, 2, 20],
    "prompt_logprobs": [None, 0, 1],
    "skip_special_tokens": [True, False],
    "include_stop_str_in_output": [False, True],
}
INVALID = {
    "n": [0, -1, 1.5, True, 10**6],
    "best_of": [0, "2"],
    "temperature": [-1.0, math.nan, math.inf, "hot"],
    "top_p": [0.0, 1.5, math.nan],
    "top_k": [-2, 2.5],
    "min_p": [-0.1, 2.0, math.inf],
    "presence_penalty": [3.0, math.nan],
    "frequency_penalty": [2.5, -math.inf],
    "repetition_penalty": [0.0, -1.0, math.inf],
    "seed": [2**63, 2**70, "seed", 1.5],
    "stop": ["", ["ok", ""], ["\ud800"], 5, [None]],
    "stop_token_ids": [[-1], "x", [1.5]],
    "max_tokens": [0, -3, 2.0],
    "min_tokens": [-1, 0.5],
    "logprobs": [-1, 1.5],
    "prompt_logprobs": [-1],
}


def _prompts(vocab: int):
    lengths = [MAX_MODEL_LEN - 1, MAX_MODEL_LEN, MAX_MODEL_LEN + 1]
    return st.one_of(
        st.sampled_from(["", " ", "\n\t ", "\ud800", "a\udfffb", "\x00", "Hello, world", "é中文🙂"]),
        st.text(max_size=40),
        st.lists(st.integers(min_value=-3, max_value=vocab + 3), max_size=MAX_MODEL_LEN + 2),
        st.sampled_from(lengths).map(lambda n: [5] * n),
        st.sampled_from(lengths).map(lambda n: {"prompt_token_ids": [7] * n}),
        st.just({"prompt_token_ids": []}),
        st.just({"prompt": "cached", "cache_salt": "s"}),
        st.just({"nothing": 1}),
        st.sampled_from([None, 3, b"bytes", [1.5, 2]]),
    )


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(model=tiny_llama_dir, dtype="float32", seed=0, max_model_len=MAX_MODEL_LEN, num_kv_blocks=24,
               block_size=8, max_num_seqs=8)


def _names_a_field(exc: ValueError, fields) -> bool:
    message = str(exc)
    return any(name in message for name in (*fields, "prompt", "sampling_params"))


def test_random_params_and_prompts_are_served_or_refused_by_name(llm):
    vocab = llm.engine.arch.vocab_size
    outcomes = {"served": 0, "params refused": 0, "request refused": 0}

    @given(
        kwargs=st.fixed_dictionaries({}, optional={name: st.sampled_from(values) for name, values in VALID.items()}),
        # One in three carries one invalid value, which must be refused naming a field.
        bad=st.one_of(st.none(), st.none(), st.sampled_from([(k, v) for k, values in INVALID.items() for v in values])),
        prompt=_prompts(vocab),
    )
    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def run(kwargs, bad, prompt) -> None:
        if bad is not None:
            kwargs = {**kwargs, bad[0]: bad[1]}
        try:
            params = SamplingParams(**kwargs)
        except ValueError as exc:
            assert _names_a_field(exc, kwargs), exc
            outcomes["params refused"] += 1
            return
        try:
            (output,) = llm.generate([prompt], params, use_tqdm=False)
        except ValueError as exc:
            assert _names_a_field(exc, kwargs), exc
            outcomes["request refused"] += 1
        else:
            assert bad is None, f"{bad} was served"  # an invalid value is always refused
            outcomes["served"] += 1
            assert output.finished and output.error is None
            assert len(output.outputs) == params.n
            for out in output.outputs:
                assert out.finish_reason in ("stop", "length")
                if params.max_tokens is not None:
                    assert len(out.token_ids) <= params.max_tokens
                # The last sampled token is never fed back, so it needs no KV slot.
                assert len(output.prompt_token_ids) + len(out.token_ids) - 1 <= MAX_MODEL_LEN
        stats = llm.stats()
        assert not llm.engine.requests
        assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"], stats

    run()
    print("offline fuzz:", outcomes)
    assert all(outcomes.values()), outcomes  # each kind really happened
    # Still healthy: the same greedy request twice gives the same tokens.
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    first, second = (llm.generate([[1, 2, 3]], params, use_tqdm=False)[0] for _ in range(2))
    assert first.outputs[0].token_ids == second.outputs[0].token_ids and len(first.outputs[0].token_ids) == 5


def test_prompt_logprobs_after_a_prefix_cache_hit(llm):
    """Found by the fuzz above: a cached prefix skipped the positions prompt logprobs must score."""
    prompt = list(range(10, 30))
    llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)  # caches its full blocks
    params = SamplingParams(max_tokens=1, prompt_logprobs=1)
    first, again = (llm.generate([prompt], params, use_tqdm=False)[0] for _ in range(2))
    assert len(first.prompt_logprobs) == len(again.prompt_logprobs) == len(prompt)
    assert [set(p) for p in first.prompt_logprobs[1:]] == [set(p) for p in again.prompt_logprobs[1:]]
