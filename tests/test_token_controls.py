"""logit_bias, allowed_token_ids and bad_words on the real default model, through ``LLM``."""

from __future__ import annotations

import pytest

from quire import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Once upon a time, there was a", "def fibonacci(n):"]


def generate(llm, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


def assert_pool_free(llm) -> None:
    stats = llm.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"], stats
    assert not llm.engine.requests


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("logit_bias", {"logit_bias": {5: 100.5}}),
        ("logit_bias", {"logit_bias": {-1: 1.0}}),
        ("logit_bias", {"logit_bias": {"x": 1.0}}),
        ("logit_bias", {"logit_bias": [1, 2]}),
        ("allowed_token_ids", {"allowed_token_ids": []}),
        ("allowed_token_ids", {"allowed_token_ids": [1, -2]}),
        ("bad_words", {"bad_words": [""]}),
        ("bad_words", {"bad_words": "word"}),
    ],
)
def test_bad_values_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_json_style_string_keys_are_token_ids():
    assert SamplingParams(logit_bias={"17": -3}).logit_bias == {17: -3.0}


def test_logit_bias_moves_greedy_choices_and_leaves_other_rows_alone(llm_fp32):
    plain = generate(llm_fp32, PROMPTS, SamplingParams(temperature=0, max_tokens=8))
    first = plain[0].outputs[0].token_ids[0]
    forced = 1234
    params = [
        SamplingParams(temperature=0, max_tokens=8, logit_bias={first: -100}),
        SamplingParams(temperature=0, max_tokens=8, logit_bias={forced: 100}),
        SamplingParams(temperature=0, max_tokens=8),
    ]
    biased = generate(llm_fp32, PROMPTS, params)
    assert biased[0].outputs[0].token_ids[0] != first
    assert first not in biased[0].outputs[0].token_ids
    assert biased[1].outputs[0].token_ids == [forced] * 8
    assert biased[2].outputs[0].token_ids == plain[2].outputs[0].token_ids  # the unbiased row is untouched
    assert_pool_free(llm_fp32)


def test_allowed_token_ids_limit_sampled_tokens(llm_fp32, tokenizer):
    allowed = tokenizer.encode(" a b c the and", add_special_tokens=False)
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=12, n=3, allowed_token_ids=allowed)
    out = generate(llm_fp32, PROMPTS[:1], params)[0]
    assert len(out.outputs) == 3
    for completion in out.outputs:
        assert len(completion.token_ids) == 12
        assert set(completion.token_ids) <= set(allowed)
    assert_pool_free(llm_fp32)


def test_bad_words_never_appear(llm_fp32, tokenizer):
    plain = generate(llm_fp32, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=24))[0].outputs[0]
    # A word the model does say greedily, spelt as its first generated token.
    word = tokenizer.decode(plain.token_ids[:1]).strip()
    assert word and word in plain.text
    banned = generate(llm_fp32, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=24, bad_words=[word]))[0]
    text = banned.outputs[0].text
    assert word not in text.split(), text
    tokens = banned.outputs[0].token_ids
    for spelling in (word, " " + word):
        ids = tokenizer.encode(spelling, add_special_tokens=False)
        assert not any(tokens[i : i + len(ids)] == ids for i in range(len(tokens))), (word, tokens)
    assert_pool_free(llm_fp32)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [("logit_bias", {"logit_bias": {10**7: 1.0}}), ("allowed_token_ids", {"allowed_token_ids": [3, 10**7]})],
)
def test_token_ids_outside_the_vocabulary_are_refused(llm_fp32, field, kwargs):
    with pytest.raises(ValueError, match=field):
        generate(llm_fp32, PROMPTS[:1], SamplingParams(max_tokens=2, **kwargs))
    assert_pool_free(llm_fp32)


def test_server_applies_logit_bias_allowed_token_ids_and_bad_words(llm_fp32, tokenizer):
    """The real server with the real ``openai`` client: the same tokens as ``LLM`` for the same settings."""
    import openai
    from server_utils import ServerThread

    from quire.engine.async_engine import AsyncLLMEngine
    from quire.entrypoints.openai.api_server import build_app

    engine = AsyncLLMEngine(llm_fp32.engine, log_stats_interval=None)
    allowed = tokenizer.encode(" a b c the and", add_special_tokens=False)
    settings = {"logit_bias": {"1234": 100}, "allowed_token_ids": allowed, "bad_words": ["Paris", "London"]}
    with ServerThread(build_app(engine, served_model_names=["smol"])) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        for name, value in settings.items():
            kwargs = {"logit_bias": value} if name == "logit_bias" else {"extra_body": {name: value}}
            served = client.completions.create(model="smol", prompt=PROMPTS[0], max_tokens=6, temperature=0, **kwargs)
            offline = engine.run_in_engine_sync(
                lambda _, n=name, v=value: generate(
                    llm_fp32, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=6, **{n: v})
                ),
                timeout=120,
            )[0]
            assert served.choices[0].text == offline.outputs[0].text, name
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="smol", prompt="x", logit_bias={"3": 101})
        assert info.value.body["param"] == "logit_bias"
    assert_pool_free(llm_fp32)
