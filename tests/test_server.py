"""The OpenAI-compatible server on the real default model, through a real uvicorn server and the `openai` client.

One server per module, on 127.0.0.1 and a free port, wrapping the session's float32 engine
(``llm_fp32``), so the offline ``LLM`` results the server must reproduce come from the very
same weights. Offline generations run on the engine's step thread (``run_in_engine_sync``),
so the two never touch the engine at once.
"""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import openai
import pytest
from server_utils import ServerThread, metric, wait_for

from quire import BeamSearchParams, SamplingParams
from quire.engine.async_engine import AsyncLLMEngine
from quire.entrypoints.openai.api_server import build_app
from quire.metrics import EngineMetrics

pytestmark = pytest.mark.slow

MODEL = "smol"
PROMPTS = ["The capital of France is", "Once upon a time, there was a", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def server(llm_fp32):
    engine = AsyncLLMEngine(llm_fp32.engine, metrics=EngineMetrics(MODEL), log_stats_interval=None)
    app = build_app(engine, served_model_names=[MODEL])
    with ServerThread(app) as running:
        running.engine = engine
        running.llm = llm_fp32
        yield running
    stats = llm_fp32.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"], stats
    assert not llm_fp32.engine.requests


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def offline(server, method: str, *args):
    """``llm.generate`` / ``llm.chat`` on the step thread, between server steps."""
    llm = server.llm
    return server.engine.run_in_engine_sync(lambda _: getattr(llm, method)(*args, use_tqdm=False), timeout=300)


def assert_pool_free(server) -> None:
    def free() -> bool:
        s = server.engine.stats()
        return s["num_free_kv_blocks"] == s["num_kv_blocks"] and s["num_running"] == 0 and s["num_waiting"] == 0

    assert wait_for(free, timeout=30), server.engine.stats()
    assert metric(server.url, "quire:num_requests_running") == 0
    assert metric(server.url, "quire:num_requests_waiting") == 0
    assert metric(server.url, "quire:kv_cache_usage_perc") == 0


def stream_text(chunks) -> tuple[dict[int, str], dict[int, str | None], object]:
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    usage = None
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.text if hasattr(choice, "text") else (choice.delta.content or "")
            texts[choice.index] = texts.get(choice.index, "") + piece
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, usage


# -- correctness against the offline API ---------------------------------------------------------


def test_greedy_completions_equal_offline(server, client):
    params = SamplingParams(temperature=0.0, max_tokens=12)
    expected = offline(server, "generate", PROMPTS, params)

    response = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.index for c in response.choices] == [0, 1, 2]
    for choice, exp in zip(response.choices, expected, strict=True):
        assert choice.text == exp.outputs[0].text
        assert choice.finish_reason == exp.outputs[0].finish_reason
    assert response.usage.prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)
    assert response.usage.completion_tokens == sum(len(e.outputs[0].token_ids) for e in expected)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert response.object == "text_completion" and response.model == MODEL

    for prompt, exp in zip(PROMPTS, expected, strict=True):
        chunks = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
        texts, reasons, usage = stream_text(chunks)
        assert texts[0] == exp.outputs[0].text
        assert reasons[0] == exp.outputs[0].finish_reason
        assert usage.prompt_tokens == len(exp.prompt_token_ids)
        assert usage.completion_tokens == len(exp.outputs[0].token_ids)

    # token-id prompts are accepted as such
    ids = expected[0].prompt_token_ids
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == expected[0].outputs[0].text


def test_greedy_chat_equals_offline(server, client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = offline(server, "chat", messages, SamplingParams(temperature=0.0, max_tokens=16))[0]

    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_completion_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.outputs[0].token_ids)
    texts, reasons, _ = stream_text(chunks)
    assert texts[0] == expected.outputs[0].text
    assert reasons[0] == expected.outputs[0].finish_reason


def test_stop_strings_streamed_and_not(server, client):
    prompt = "1, 2, 3, 4, 5,"
    free = offline(server, "generate", [prompt], SamplingParams(temperature=0.0, max_tokens=20))[0].outputs[0].text
    assert " 8," in free, free
    stopped = offline(server, "generate", [prompt], SamplingParams(temperature=0.0, max_tokens=20, stop=[" 8,"]))
    want = stopped[0].outputs[0].text
    assert want == free[: free.index(" 8,")]

    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=[" 8,"])
    assert response.choices[0].text == want
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].model_extra["stop_reason"] == " 8,"
    # Streaming never sends text a stop string later takes back.
    chunks = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=" 8,", stream=True
    )
    texts, reasons, _ = stream_text(chunks)
    assert texts[0] == want and reasons[0] == "stop"
    kept = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=[" 8,"],
        extra_body={"include_stop_str_in_output": True},
    )
    assert kept.choices[0].text == want + " 8,"


def test_seeded_sampling_is_reproducible_and_equals_offline(server, client):
    prompt = "My favourite animal is"
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0.9, top_p=0.95, seed=1234)
    first = client.completions.create(**kwargs).choices[0].text
    second = client.completions.create(**kwargs).choices[0].text
    assert first == second
    expected = offline(
        server, "generate", [prompt], SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=12)
    )
    assert first == expected[0].outputs[0].text
    other = client.completions.create(**{**kwargs, "seed": 4321}).choices[0].text
    assert other != first


def test_n_best_of_and_beam_search_on_completions(server, client):
    prompt = PROMPTS[1]
    sampled = {"max_tokens": 6, "temperature": 1.0, "seed": 5}
    response = client.completions.create(model=MODEL, prompt=prompt, n=3, **sampled)
    texts = [c.text for c in sorted(response.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(response.choices, key=lambda c: c.index)] == [0, 1, 2]
    (expected,) = offline(server, "generate", [prompt], SamplingParams(n=3, **sampled))
    assert texts == [o.text for o in expected.outputs]
    assert response.usage.completion_tokens == sum(len(o.token_ids) for o in expected.outputs)
    texts_streamed, reasons, _ = stream_text(
        client.completions.create(model=MODEL, prompt=prompt, n=3, stream=True, **sampled)
    )
    assert [texts_streamed[i] for i in range(3)] == texts and len(reasons) == 3

    response = client.completions.create(model=MODEL, prompt=prompt, n=2, best_of=4, **sampled)
    (expected,) = offline(server, "generate", [prompt], SamplingParams(n=2, best_of=4, **sampled))
    assert [c.text for c in sorted(response.choices, key=lambda c: c.index)] == [o.text for o in expected.outputs]

    response = client.completions.create(
        model=MODEL, prompt=prompt, n=2, max_tokens=8, temperature=0, extra_body={"use_beam_search": True}
    )
    (beams,) = offline(server, "beam_search", [prompt], BeamSearchParams(beam_width=2, max_tokens=8))
    got = [c.text for c in sorted(response.choices, key=lambda c: c.index)]
    assert got == [s.output_text for s in beams.sequences]
    response = client.completions.create(
        model=MODEL, prompt=prompt, n=1, best_of=3, max_tokens=8, extra_body={"use_beam_search": True}
    )
    (beams,) = offline(server, "beam_search", [prompt], BeamSearchParams(beam_width=3, max_tokens=8))
    assert [c.text for c in response.choices] == [beams.sequences[0].output_text]
    assert_pool_free(server)


def test_n_on_chat(server, client):
    messages = [{"role": "user", "content": "Name a colour."}]
    sampled = {"max_tokens": 6, "temperature": 1.0, "seed": 9}
    response = client.chat.completions.create(model=MODEL, messages=messages, n=3, **sampled)
    (expected,) = offline(server, "chat", messages, SamplingParams(n=3, **sampled))
    choices = sorted(response.choices, key=lambda c: c.index)
    assert [c.message.content for c in choices] == [o.text for o in expected.outputs]
    streamed, reasons, _ = stream_text(
        client.chat.completions.create(model=MODEL, messages=messages, n=3, stream=True, **sampled)
    )
    assert [streamed[i] for i in range(3)] == [o.text for o in expected.outputs] and len(reasons) == 3
    assert_pool_free(server)


def test_completion_logprobs_and_echo(server, client):
    prompt = "The quick brown fox"
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=2, prompt_logprobs=2)
    exp = offline(server, "generate", [prompt], params)[0]
    out = exp.outputs[0]

    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    lp = response.choices[0].logprobs
    assert len(lp.tokens) == len(out.token_ids) == len(lp.token_logprobs) == len(lp.top_logprobs)
    for i, tid in enumerate(out.token_ids):
        assert lp.token_logprobs[i] == pytest.approx(out.logprobs[i][tid].logprob, abs=1e-4)
        assert 2 <= len(lp.top_logprobs[i]) <= 3
        assert lp.tokens[i] in lp.top_logprobs[i]
    assert "".join(lp.tokens) == response.choices[0].text
    assert lp.text_offset[0] == len(prompt)
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens, strict=False))

    echoed = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2, echo=True
    ).choices[0]
    assert echoed.text == prompt + out.text
    n_prompt = len(exp.prompt_token_ids)
    assert len(echoed.logprobs.tokens) == n_prompt + len(out.token_ids)
    assert echoed.logprobs.token_logprobs[0] is None and echoed.logprobs.top_logprobs[0] is None
    for i in range(1, n_prompt):
        tid = exp.prompt_token_ids[i]
        assert echoed.logprobs.token_logprobs[i] == pytest.approx(exp.prompt_logprobs[i][tid].logprob, abs=1e-4)
    assert echoed.logprobs.text_offset[0] == 0

    # Streamed logprobs add up to the same thing.
    tokens, token_logprobs = [], []
    for chunk in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2, stream=True
    ):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                token_logprobs += choice.logprobs.token_logprobs
    assert tokens == lp.tokens
    assert token_logprobs == pytest.approx(lp.token_logprobs, abs=1e-6)


def test_chat_logprobs(server, client):
    messages = [{"role": "user", "content": "Say hello."}]
    response = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    assert "".join(c.token for c in content) == response.choices[0].message.content
    for entry in content:
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    streamed = []
    for chunk in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3, stream=True
    ):
        for choice in chunk.choices:
            if choice.logprobs is not None and choice.logprobs.content:
                streamed += [c.token for c in choice.logprobs.content]
    assert streamed == [c.token for c in content]


def test_models_health_tokenize(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{server.url}/health").status_code == 200
    tokenizer = server.llm.get_tokenizer()
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens["tokens"] == tokenizer.encode("Hello world", add_special_tokens=True)
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == server.engine.max_model_len
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text == {"prompt": "Hello world"}
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > tokens["count"]


# -- errors ----------------------------------------------------------------------------------------


def _post(server, path: str, body, **kwargs) -> httpx.Response:
    if isinstance(body, str | bytes):
        return httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, **kwargs)
    return httpx.post(server.url + path, json=body, **kwargs)


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/completions", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
        ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"bogus": True}}, 400,
         "stream_options.bogus"),
        ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
        ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
        ("/v1/completions", {"prompt": "x", "n": 3, "best_of": 2}, 400, "best_of"),
        ("/v1/completions", {"prompt": "x", "n": 2, "best_of": 3, "stream": True}, 400, "best_of"),
        ("/v1/completions", {"prompt": "x", "use_beam_search": True, "stop": "."}, 400, "stop"),
        ("/v1/completions", {"prompt": "x", "use_beam_search": True, "logprobs": 1}, 400, "logprobs"),
        ("/v1/completions", {"prompt": "x", "n": 100000}, 400, "n"),
        ("/v1/completions", {"prompt": "x", "priority": 5}, 400, "priority"),
        ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
        ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
        ("/v1/completions", {"prompt": "x", "min_tokens": 9, "max_tokens": 3}, 400, "min_tokens"),
        ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 500}}, 400, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "allowed_token_ids": [99999999]}, 400, "allowed_token_ids"),
        ("/v1/completions", {"prompt": "x", "bad_words": [""]}, 400, "bad_words"),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"prompt": []}, 400, "prompt"),
        ("/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "prompt"),
        ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
        ("/v1/completions", {"prompt": [5] * 9000}, 400, "prompt"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
         "top_logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": []}, 400, "tools"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "nope"}, 404, "model"),
        ("/v1/completions", "{not json", 400, None),
    ],
)
def test_error_bodies(server, path, body, status, param):
    response = _post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert error["message"]
    if status == 404:
        assert error["code"] == "model_not_found"


def test_prompt_plus_max_tokens_over_the_context_is_400(server):
    limit = server.engine.max_model_len
    response = _post(server, "/v1/completions", {"prompt": [5] * (limit - 4), "max_tokens": 10})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "max_tokens"
    assert str(limit) in response.json()["error"]["message"]


def test_openai_client_sees_the_errors(server, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", n=0)
    assert info.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", extra_body={"not_a_field": 1})
    assert info.value.body["param"] == "not_a_field"
    assert httpx.get(f"{server.url}/no/such/route").status_code == 404
    assert_pool_free(server)


# -- load, cancellation, metrics -------------------------------------------------------------------


def test_64_concurrent_streams_complete(server):
    before = metric(server.url, "quire:request_success_total")

    async def one(aclient: openai.AsyncOpenAI, i: int) -> tuple[str, int]:
        stream = await aclient.completions.create(
            model=MODEL, prompt=f"Request number {i} says:", max_tokens=8, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
        text, tokens, reason = "", None, None
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.text
                reason = choice.finish_reason or reason
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return reason, tokens

    async def main() -> list:
        limits = httpx.Limits(max_connections=100)
        async with openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=300,
            http_client=httpx.AsyncClient(limits=limits, timeout=300),
        ) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(64)))

    results = asyncio.run(main())
    assert results == [("length", 8)] * 64
    assert metric(server.url, "quire:request_success_total") - before == 64
    assert_pool_free(server)
    peak = server.engine.stats()["peak_used_kv_blocks"]
    assert peak >= 64  # they really ran together: one block each at least
    assert metric(server.url, "quire:time_to_first_token_seconds_count") >= 64
    assert metric(server.url, "quire:iteration_tokens_total_count") > 0


def test_50_cancelled_streams_leave_no_block_held(server):
    generated_before = metric(server.url, "quire:generation_tokens_total")
    rng = random.Random(0)
    plan = [rng.choice([0, 0, 1, 2, 3, 5, 8]) for _ in range(50)]  # chunks to read before hanging up

    async def one(http: httpx.AsyncClient, i: int, after: int) -> int:
        body = {
            "model": MODEL, "prompt": f"Story {i}: once upon a time", "max_tokens": 1024, "stream": True,
            "temperature": 0.8, "seed": i, "ignore_eos": True,
        }
        if i % 2:
            body = {
                "model": MODEL, "messages": [{"role": "user", "content": f"Tell story {i}"}], "max_tokens": 1024,
                "stream": True, "ignore_eos": True,
            }
        path = "/v1/completions" if i % 2 == 0 else "/v1/chat/completions"
        seen = 0
        async with http.stream("POST", server.url + path, json=body) as response:
            assert response.status_code == 200
            if after == 0:
                return 0
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    seen += 1
                    if seen >= after:
                        break
        return seen

    async def main() -> list[int]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as http:
            return await asyncio.gather(*(one(http, i, after) for i, after in enumerate(plan)))

    seen = asyncio.run(main())
    assert seen == plan
    assert_pool_free(server)  # 50 x 1024 tokens would take minutes: they were aborted
    assert metric(server.url, "quire:generation_tokens_total") - generated_before < 50 * 1024 / 4
    # A client that gives up on a non-streaming request frees its blocks too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}/v1/completions",
            json={"model": MODEL, "prompt": "Count:", "max_tokens": 2000, "ignore_eos": True},
            timeout=1.5,
        )
    assert_pool_free(server)
    assert httpx.get(f"{server.url}/health").status_code == 200
    after = json.loads(_post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 3}).text)
    assert after["usage"]["completion_tokens"] == 3 or after["choices"][0]["finish_reason"] == "stop"
