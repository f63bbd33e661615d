"""End-to-end behaviour of the engine on the real default model."""

from __future__ import annotations

import pytest

from quire import LLM, SamplingParams

pytestmark = pytest.mark.slow

_TOPICS = [
    "the ocean", "a lighthouse keeper", "prime numbers", "the history of paper", "a robot chef",
    "winter in Oslo", "the speed of light", "honey bees", "a chess opening", "volcanoes",
    "a library at night", "the first computer", "migrating birds", "a desert city", "tea ceremonies",
    "the moon landing",
]


def _pressure_prompts(n: int = 16) -> list[str]:
    return [f"Write a short story about {t}. It begins:" for t in _TOPICS[:n]]


def _assert_pool_free(llm: LLM) -> None:
    stats = llm.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"], stats


def test_generate_returns_vllm_shaped_outputs(llm_fp32):
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=3)
    outputs = llm_fp32.generate(["The capital of France is", "1, 2, 3,"], params, use_tqdm=False)
    assert [o.prompt for o in outputs] == ["The capital of France is", "1, 2, 3,"]
    for out in outputs:
        assert out.finished and len(out.outputs) == 1
        completion = out.outputs[0]
        assert completion.index == 0
        assert completion.finish_reason == "length" and len(completion.token_ids) == 12
        assert completion.text == llm_fp32.get_tokenizer().decode(completion.token_ids, skip_special_tokens=True)
        assert len(completion.logprobs) == 12
        for token, position in zip(completion.token_ids, completion.logprobs, strict=True):
            assert token in position and position[token].rank == 1  # greedy picks the top token
            assert len(position) == 3  # the greedy token is itself one of the top 3
            assert sorted(lp.rank for lp in position.values()) == [1, 2, 3]
            assert list(position.values()) == sorted(position.values(), key=lambda lp: -lp.logprob)
        assert completion.cumulative_logprob == pytest.approx(
            sum(p[t].logprob for t, p in zip(completion.token_ids, completion.logprobs, strict=True))
        )
    _assert_pool_free(llm_fp32)


def test_preemption_under_memory_pressure_keeps_greedy_outputs(llm_fp32):
    prompts = _pressure_prompts()
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    expected = llm_fp32.generate(prompts, params, use_tqdm=False)
    # 24 blocks of 16 tokens hold 384 tokens; the 16 requests need ~16 x 60.
    small = LLM(dtype="float32", num_kv_blocks=24, block_size=16)
    got = small.generate(prompts, params, use_tqdm=False)
    stats = small.stats()
    assert stats["num_preemptions"] > 0, stats
    assert stats["peak_used_kv_blocks"] <= 24
    for a, b in zip(expected, got, strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].text == a.outputs[0].text
    _assert_pool_free(small)


def test_chunked_prefill_matches_whole_prefill(llm_fp32):
    """A prompt split over many steps by a small token budget gives the same greedy output."""
    prompt = "Memory is managed in pages. " * 40
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=1)
    whole = llm_fp32.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    chunked_llm = LLM(dtype="float32", max_num_batched_tokens=32, num_kv_blocks=64)
    chunked = chunked_llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert chunked.token_ids == whole.token_ids
    for a, b in zip(whole.logprobs, chunked.logprobs, strict=True):
        token = next(iter(a))
        assert b[token].logprob == pytest.approx(a[token].logprob, abs=1e-4)


def test_seeded_sampling_is_independent_of_the_batch(llm_fp32):
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=32, ignore_eos=True)
    prompt = "Tell me about your favourite place:"
    alone = llm_fp32.generate([prompt], seeded, use_tqdm=False)[0].outputs[0]
    others = SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True)
    prompts = _pressure_prompts(15)
    batch = llm_fp32.generate(
        prompts[:7] + [prompt] + prompts[7:], [others] * 7 + [seeded] + [others] * 8, use_tqdm=False
    )
    assert batch[7].outputs[0].text == alone.text
    assert batch[7].outputs[0].token_ids == alone.token_ids
    # A different seed gives a different text: the seed really drives the sampling.
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=99, max_tokens=32, ignore_eos=True)
    assert llm_fp32.generate([prompt], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone.token_ids


def test_stop_strings_and_stop_tokens(llm_fp32):
    tokenizer = llm_fp32.get_tokenizer()
    prompt = "Count: 1, 2, 3, 4,"
    free = llm_fp32.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)[0]
    text = free.outputs[0].text
    assert " 7" in text, text
    stopped = llm_fp32.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, stop=" 7"), use_tqdm=False)
    out = stopped[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == " 7"
    assert out.text == text[: text.index(" 7")]
    kept = llm_fp32.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=20, stop=[" 7"], include_stop_str_in_output=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert kept.text == text[: text.index(" 7") + 2]
    # A stop token: the first generated token id stops the sequence right away.
    first = free.outputs[0].token_ids[1]
    by_token = llm_fp32.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[first]), use_tqdm=False
    )[0].outputs[0]
    assert by_token.finish_reason == "stop" and by_token.stop_reason == first
    assert by_token.token_ids == free.outputs[0].token_ids[:2]
    assert by_token.text == tokenizer.decode(free.outputs[0].token_ids[:1])


def test_eos_min_tokens_and_ignore_eos(llm_fp32):
    messages = [{"role": "user", "content": "Say hi."}]
    natural = llm_fp32.chat(messages, SamplingParams(temperature=0.0, max_tokens=200), use_tqdm=False)[0].outputs[0]
    assert natural.finish_reason == "stop" and natural.stop_reason is None
    eos = llm_fp32.get_tokenizer().eos_token_id
    assert natural.token_ids[-1] == eos and len(natural.token_ids) < 200
    longer = llm_fp32.chat(
        messages, SamplingParams(temperature=0.0, max_tokens=200, min_tokens=len(natural.token_ids) + 5),
        use_tqdm=False,
    )[0].outputs[0]
    assert len(longer.token_ids) >= len(natural.token_ids) + 5
    assert eos not in longer.token_ids[: len(natural.token_ids) + 4]
    ignored = llm_fp32.chat(
        messages, SamplingParams(temperature=0.0, max_tokens=len(natural.token_ids) + 3, ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == len(natural.token_ids) + 3


def test_prompt_logprobs(llm_fp32):
    prompt = "The quick brown fox jumps over the lazy dog"
    out = llm_fp32.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    ids = out.prompt_token_ids
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for token, position in zip(ids[1:], out.prompt_logprobs[1:], strict=True):
        assert token in position and position[token].logprob <= 0
        assert 2 <= len(position) <= 3
    # Chunked prefill and a small pool (preemption) give the same prompt logprobs.
    small = LLM(dtype="float32", max_num_batched_tokens=4, num_kv_blocks=8, block_size=4)
    again = small.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    for a, b in zip(out.prompt_logprobs[1:], again.prompt_logprobs[1:], strict=True):
        assert set(a) == set(b)
        for token in a:
            assert b[token].logprob == pytest.approx(a[token].logprob, abs=1e-4)


def test_penalties_change_greedy_output(llm_fp32):
    prompt = "1 1 1 1 1 1 1 1"
    plain = llm_fp32.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)[0]
    penalised = llm_fp32.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=16, repetition_penalty=1.8, frequency_penalty=1.0),
        use_tqdm=False,
    )[0]
    one = llm_fp32.get_tokenizer().convert_tokens_to_ids("1")
    assert plain.outputs[0].token_ids.count(one) >= 4  # the model keeps counting ones...
    assert penalised.outputs[0].token_ids.count(one) < plain.outputs[0].token_ids.count(one)  # ...unless penalised


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_sampling_params_are_rejected(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_requests_leave_the_engine_serving(llm_fp32):
    good = SamplingParams(temperature=0.0, max_tokens=8)
    before = llm_fp32.generate(["Hello there"], good, use_tqdm=False)[0].outputs[0].token_ids
    too_long = {"prompt_token_ids": [100] * (llm_fp32.engine.max_model_len + 1)}
    with pytest.raises(ValueError, match="max_model_len"):
        llm_fp32.generate(["fine prompt", too_long], good, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm_fp32.generate([""], good, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm_fp32.generate([{"prompt_token_ids": []}], good, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm_fp32.generate([{"prompt_token_ids": [1, -5]}], good, use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params"):
        llm_fp32.generate(["a", "b"], [good], use_tqdm=False)
    _assert_pool_free(llm_fp32)
    assert llm_fp32.stats()["num_waiting"] == 0 and llm_fp32.stats()["num_running"] == 0
    assert llm_fp32.generate(["Hello there"], good, use_tqdm=False)[0].outputs[0].token_ids == before


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        LLM(model=str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        LLM(model="HuggingFaceTB/SmolLM2-135M-Instruct")


def test_bad_engine_arguments_name_the_field():
    with pytest.raises(ValueError, match="block_size"):
        LLM(block_size=0)
    with pytest.raises(ValueError, match="dtype"):
        LLM(dtype="float64")
    with pytest.raises(TypeError, match="not_an_arg"):
        LLM(not_an_arg=1)


def test_a_kv_pool_larger_than_memory_is_refused_by_name(tiny_llama_dir):
    """The pool is written in full at start-up: asking for more than the machine has is a clear
    error before anything is allocated, not the OS killing the process."""
    with pytest.raises(ValueError, match="kv_cache_memory_gb=100000"):
        LLM(model=tiny_llama_dir, kv_cache_memory_gb=100_000)
    with pytest.raises(ValueError, match="num_kv_blocks=1000000000"):
        LLM(model=tiny_llama_dir, num_kv_blocks=10**9)


def test_abort_frees_blocks(llm_fp32):
    engine = llm_fp32.engine
    engine.add_request("abort-me", "A long story begins", SamplingParams(max_tokens=100, ignore_eos=True))
    engine.add_request("keep-me", "Another story", SamplingParams(temperature=0.0, max_tokens=5))
    for _ in range(3):
        engine.step()
    assert llm_fp32.stats()["num_free_kv_blocks"] < llm_fp32.stats()["num_kv_blocks"]
    aborted = engine.abort_request("abort-me")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["keep-me"]
    _assert_pool_free(llm_fp32)
