"""The server under overload and faults: admission control, request timeouts, one failing request.

A real uvicorn server on 127.0.0.1 around the tiny random Llama (fast steps) with
``max_num_seqs=1``: one request runs at a time and every other one waits for its first token,
so the admission queue fills deterministically, whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest
from server_utils import ServerThread, metric, wait_for

import quire
from quire import SamplingParams
from quire.config import EngineArgs
from quire.engine.admission import AdmissionControl, RequestRejected
from quire.engine.async_engine import AsyncLLMEngine
from quire.engine.llm_engine import LLMEngine
from quire.entrypoints.openai.api_server import build_app
from quire.metrics import EngineMetrics

pytestmark = pytest.mark.slow

MODEL = "tiny"
MAX_WAITING = 2
LONG = 900  # tokens of the request that holds the only running seat


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    llm_engine = LLMEngine(EngineArgs(model=tiny_llama_dir, dtype="float32", seed=0, max_num_seqs=1, num_kv_blocks=80))
    engine = AsyncLLMEngine(
        llm_engine, metrics=EngineMetrics(MODEL), log_stats_interval=None,
        admission=AdmissionControl(max_waiting_requests=MAX_WAITING),
    )
    with ServerThread(build_app(engine, served_model_names=[MODEL], request_timeout=120)) as running:
        running.engine = engine
        yield running


def _pool_free(server) -> bool:
    s = server.engine.stats()
    return s["num_free_kv_blocks"] == s["num_kv_blocks"] and s["num_running"] == 0 and s["num_waiting"] == 0


def _assert_healthy_and_free(server) -> None:
    assert wait_for(lambda: _pool_free(server), timeout=60), server.engine.stats()
    assert server.engine.admission.num_waiting == 0
    assert server.engine.num_in_flight == 0
    assert httpx.get(f"{server.url}/health").status_code == 200


def _events(lines) -> list[dict | str]:
    out = []
    for line in lines:
        if line.startswith("data:"):
            payload = line[5:].strip()
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def _post(url: str, body: dict) -> httpx.Response:
    """POST ``body`` as ASCII JSON (so it may hold lone surrogates, as "\\udXXX" escapes)."""
    return httpx.post(url, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=60)


def _body(prompt: str, max_tokens: int, **extra) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, **extra}


def test_admission_control_refuses_past_the_queue_bound(server):
    url = server.url
    rejected_before = metric(url, "quire:num_requests_rejected_total", {"reason": "waiting_requests"})

    async def main() -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            # One request holds the only running seat; MAX_WAITING more fill the queue behind it.
            async with http.stream("POST", f"{url}/v1/completions", json=_body("runner", LONG, stream=True)) as first:
                assert first.status_code == 200
                lines = first.aiter_lines()
                assert (await anext(lines)).startswith("data:")  # it is running: no longer queued
                queued = [
                    asyncio.create_task(http.post(f"{url}/v1/completions", json=_body(f"queued {i}", 4)))
                    for i in range(MAX_WAITING)
                ]
                assert await asyncio.to_thread(wait_for, lambda: server.engine.admission.num_waiting == MAX_WAITING)
                refused = await http.post(f"{url}/v1/completions", json=_body("one too many", 4))
                chat = await http.post(
                    f"{url}/v1/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                )
                for response in (refused, chat):
                    assert response.status_code == 503, response.text
                    assert int(response.headers["retry-after"]) >= 1
                    error = response.json()["error"]
                    assert set(error) == {"message", "type", "param", "code"}
                    assert error["type"] == "server_error" and error["code"] == "server_overloaded"
                    assert "overloaded" in error["message"]
                async for _ in lines:  # the runner finishes; then the queued ones run
                    pass
                for task in queued:
                    response = await task
                    assert response.status_code == 200
                    assert response.json()["usage"]["completion_tokens"] == 4

    asyncio.run(main())
    after = metric(url, "quire:num_requests_rejected_total", {"reason": "waiting_requests"})
    assert after - rejected_before == 2
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    assert client.completions.create(model=MODEL, prompt="after", max_tokens=3).usage.completion_tokens == 3
    _assert_healthy_and_free(server)


def test_admission_token_bound_and_draining_unit():
    gate = AdmissionControl(max_waiting_requests=None, max_waiting_tokens=100)
    gate.admit("a", 500)  # alone it is admitted, however long: every valid request can run eventually
    with pytest.raises(RequestRejected) as info:
        gate.admit("b", 1)
    assert info.value.reason == "waiting_tokens"
    gate.release("a")
    gate.admit("b", 60)
    gate.admit("c", 40)
    with pytest.raises(RequestRejected):
        gate.admit("d", 1)
    gate.release("b")
    gate.release("b")  # twice is harmless
    assert gate.waiting_tokens == 40 and gate.num_waiting == 1
    gate.begin_drain()
    with pytest.raises(RequestRejected) as info:
        gate.admit("e", 1)
    assert info.value.reason == "draining"
    with pytest.raises(ValueError, match="max_waiting_requests"):
        AdmissionControl(max_waiting_requests=0)


def test_request_timeout_aborts_and_frees(server):
    url = server.url
    before = server.engine.stats()["num_generated_tokens"]
    # Streamed: it starts, then runs out of time mid-generation and gets a final error event.
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=_body("timed", LONG, stream=True, request_timeout=0.3), timeout=60
    ) as response:
        assert response.status_code == 200
        events = _events(response.iter_lines())
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["type"] == "timeout_error" and error["code"] == "request_timeout", error
    text_chunks = [e for e in events[:-2] if isinstance(e, dict) and "choices" in e]
    assert all(c["finish_reason"] is None for e in text_chunks for c in e["choices"])  # cut short, not finished
    # Not streamed: a clear 408 in OpenAI's format.
    response = httpx.post(f"{url}/v1/completions", json=_body("timed", LONG, request_timeout=0.3), timeout=60)
    assert response.status_code == 408, response.text
    assert response.json()["error"]["code"] == "request_timeout"
    _assert_healthy_and_free(server)
    assert server.engine.stats()["num_generated_tokens"] - before < 2 * LONG  # both were cut short
    # A timeout past the field's bound is refused by name.
    response = httpx.post(f"{url}/v1/completions", json=_body("x", 2, request_timeout=10**6))
    assert response.status_code == 400 and response.json()["error"]["param"] == "request_timeout"


def test_a_fault_in_one_request_fails_only_that_request(server):
    url = server.url
    poison = [7, 7, 7, 7, 7]
    engine = server.engine
    prompts = [[11, 12, 13], poison, [21, 22, 23, 24]]
    solo = [
        httpx.post(f"{url}/v1/completions", json=_body(p, 6), timeout=60).json()["choices"][0]["text"]
        for p in (prompts[0], prompts[2])
    ]
    fault = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")  # as a detokenizer bug would raise
    engine.run_in_engine_sync(lambda e: e.inject_fault(lambda r: r.prompt_token_ids == poison, fault))
    try:
        async def main(batch):
            async with httpx.AsyncClient(timeout=60) as http:  # at most MAX_WAITING at once: none refused
                return await asyncio.gather(*(http.post(f"{url}/v1/completions", json=_body(p, 6)) for p in batch))

        good_a, bad = asyncio.run(main(prompts[:2]))
        (good_b,) = asyncio.run(main(prompts[2:]))
        bad_stream = httpx.post(f"{url}/v1/completions", json=_body(poison, 6, stream=True), timeout=60)
        assert bad_stream.status_code == 200
    finally:
        engine.run_in_engine_sync(lambda e: e.inject_fault(None))
    assert bad.status_code == 500
    assert bad.json()["error"]["type"] == "server_error" and "UnicodeDecodeError" in bad.json()["error"]["message"]
    events = _events(bad_stream.text.splitlines())
    assert events[-1] == "[DONE]" and "UnicodeDecodeError" in events[-2]["error"]["message"]
    # The others are untouched: the same greedy text as alone.
    assert [good_a.json()["choices"][0]["text"], good_b.json()["choices"][0]["text"]] == solo
    _assert_healthy_and_free(server)
    assert httpx.post(f"{url}/v1/completions", json=_body(poison, 3)).status_code == 200  # fault removed


def test_a_fault_offline_fails_only_that_request(tiny_llama_dir):
    from quire import LLM

    llm = LLM(model=tiny_llama_dir, dtype="float32", seed=0, num_kv_blocks=32)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    prompts = [[3, 4, 5], [9, 9, 9], [6, 5, 4]]
    expected = llm.generate(prompts, params, use_tqdm=False)
    llm.engine.inject_fault(lambda r: r.prompt_token_ids == [9, 9, 9])
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert outputs[1].finished and outputs[1].error is not None and "injected fault" in outputs[1].error
    assert outputs[1].outputs[0].finish_reason == "abort"
    for i in (0, 2):
        assert outputs[i].error is None
        assert outputs[i].outputs[0].token_ids == expected[i].outputs[0].token_ids
    stats = llm.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"] and not llm.engine.requests


# -- request size limits ---------------------------------------------------------------------------

_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "x", "n": 65}, "n"),
        ("/v1/completions", {"prompt": "x", "best_of": 10**6}, "best_of"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 10**12}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "stop": ["s"] * 33}, "stop"),
        ("/v1/completions", {"prompt": "x", "stop": "s" * 257}, "stop"),
        ("/v1/completions", {"prompt": "x", "stop_token_ids": [1] * 257}, "stop_token_ids"),
        ("/v1/completions", {"prompt": ["x"] * 65}, "prompt"),
        ("/v1/completions", {"prompt": [[1]] * 65}, "prompt"),
        ("/v1/completions", {"prompt": "x", "seed": 2**64}, "seed"),
        ("/v1/completions", {"prompt": "x", "request_timeout": 0}, "request_timeout"),
        ("/v1/completions", {"prompt": "\ud800 lone surrogate"}, "prompt"),
        ("/v1/completions", {"prompt": "x", "stop": ["\udfff"]}, "stop"),
        ("/v1/chat/completions", {**_CHAT, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ("/v1/chat/completions", {**_CHAT, "n": 65}, "n"),
        ("/v1/chat/completions", {**_CHAT, "max_completion_tokens": 10**9}, "max_completion_tokens"),
        ("/v1/chat/completions", {**_CHAT, "stop": ["s"] * 33}, "stop"),
        ("/tokenize", {"prompt": "\ud800"}, "prompt"),
        ("/v1/chat/completions", {**_CHAT, "chat_template": "{% for i in range(99999) %}x{% endfor %}"},
         "chat_template"),
    ],
)
def test_each_limit_is_a_400_naming_its_field(server, path, body, param):
    response = _post(server.url + path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "repetition_penalty"])
def test_non_finite_numbers_are_400(server, field):
    raw = '{"prompt": "x", "' + field + '": NaN}'  # Python's JSON parser takes NaN; the API does not
    response = httpx.post(f"{server.url}/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text


def test_request_body_size_is_bounded(tiny_llama_dir, server):
    big = {"prompt": "x" * 3000, "max_tokens": 1}
    app = build_app(server.engine, served_model_names=[MODEL], manage_engine=False, max_request_bytes=2048)
    with ServerThread(app) as small:
        response = httpx.post(f"{small.url}/v1/completions", json=big)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large" and "2048" in response.json()["error"]["message"]

        def chunked():  # no content-length: counted as it arrives
            for _ in range(10):
                yield b" " * 1000
            yield json.dumps(big).encode()

        headers = {"content-type": "application/json"}
        response = httpx.post(f"{small.url}/v1/completions", content=chunked(), headers=headers)
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "request_too_large"
        ok = httpx.post(f"{small.url}/v1/completions", json={"prompt": "x", "max_tokens": 1, "model": MODEL})
        assert ok.status_code == 200
    # Unicode the client sent is echoed in errors as valid (ASCII) JSON.
    response = _post(f"{server.url}/v1/completions", {"prompt": "x", "model": "\ud800"})
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"
    _assert_healthy_and_free(server)


# -- graceful shutdown of `quire serve` ------------------------------------------------------------


@contextlib.contextmanager
def _quire_serve(model_dir: str, log_path, *flags: str):
    """A real `quire serve` subprocess on 127.0.0.1; yields (process, url) once /health is 200."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = str(Path(quire.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [
        sys.executable, "-m", "quire.entrypoints.cli", "serve", model_dir, "--port", str(port), "--dtype", "float32",
        "--served-model-name", MODEL, "--num-kv-blocks", "80", "--max-num-seqs", "1", "--uvicorn-log-level", "info",
        *flags,
    ]
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            def up() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(Path(log_path).read_text())
                try:
                    return httpx.get(f"{url}/health", timeout=1).status_code == 200
                except httpx.TransportError:
                    return False

            assert wait_for(up, timeout=180, interval=0.3)
            yield proc, url
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def _stream_events(url: str, body: dict, started: threading.Event) -> list:
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        events = []
        for line in response.iter_lines():
            if line.startswith("data:"):
                started.set()
                payload = line[5:].strip()
                events.append(payload if payload == "[DONE]" else json.loads(payload))
        return events


def _finish_reasons(events: list) -> list:
    chunks = [e for e in events if isinstance(e, dict)]
    return [c["finish_reason"] for e in chunks for c in e.get("choices", []) if c["finish_reason"]]


def test_sigterm_drains_in_flight_streams_and_exits_0(tiny_llama_dir, tmp_path):
    log = tmp_path / "serve.log"
    with _quire_serve(tiny_llama_dir, log, "--shutdown-timeout", "120") as (proc, url):
        started = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            # One seat: the first runs, the others wait; all three are in flight when the signal comes.
            streams = [
                pool.submit(_stream_events, url, _body(f"drain {i}", 600, stream=True), started) for i in range(3)
            ]
            assert started.wait(60)
            assert wait_for(lambda: metric(url, "quire:num_requests_waiting") == 2)
            proc.send_signal(signal.SIGTERM)
            refused = wait_for(lambda: httpx.post(f"{url}/v1/completions", json=_body("late", 2)).status_code == 503)
            assert refused
            late = httpx.post(f"{url}/v1/completions", json=_body("late", 2))
            assert late.status_code == 503 and late.headers["retry-after"]
            assert late.json()["error"]["code"] == "server_shutting_down"
            assert httpx.get(f"{url}/health").status_code == 503
            results = [f.result(timeout=180) for f in streams]
        assert proc.wait(timeout=60) == 0, log.read_text()
    for events in results:  # every in-flight stream finished in full
        assert events[-1] == "[DONE]" and not any("error" in e for e in events if isinstance(e, dict))
        assert _finish_reasons(events) == ["length"]
    assert "draining" in log.read_text()


def test_sigint_aborts_what_outlives_the_shutdown_timeout(tiny_llama_dir, tmp_path):
    log = tmp_path / "serve.log"
    with _quire_serve(tiny_llama_dir, log, "--shutdown-timeout", "0.5") as (proc, url):
        started = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            streams = [
                pool.submit(_stream_events, url, _body(f"long {i}", 1000, stream=True), started) for i in range(2)
            ]
            assert started.wait(60)
            assert wait_for(lambda: metric(url, "quire:num_requests_waiting") == 1)
            proc.send_signal(signal.SIGINT)
            results = [f.result(timeout=120) for f in streams]
        assert proc.wait(timeout=60) == 0, log.read_text()
    for events in results:
        assert events[-1] == "[DONE]"
    # The second waited behind the first (one seat) for far longer than 0.5 s: it was cut off.
    errors = [e["error"] for events in results for e in events if isinstance(e, dict) and "error" in e]
    assert errors and all("shut down" in e["message"] and e["type"] == "server_error" for e in errors), errors
    assert "aborted" in log.read_text()


def test_bench_serve_counts_rejections_and_server_rss(server, tmp_path):
    from quire.entrypoints.cli import main as cli_main

    result = tmp_path / "burst.json"
    code = cli_main([
        "bench", "serve", "--base-url", server.url, "--request-rate", "inf", "--num-prompts", "24",
        "--dataset", "random", "--random-input-len", "8", "--random-output-len", "4", "--ignore-eos",
        "--baseline-num-prompts", "2", "--result-json", str(result), "--results-dir", str(tmp_path),
    ])
    assert code == 0
    summary = json.loads(result.read_text())
    # One seat and two queue places: most of a 24-request burst is refused, the rest completes.
    assert summary["rejected"] > 0 and summary["failed"] == 0
    assert summary["completed"] + summary["rejected"] == 24 and summary["completed"] >= MAX_WAITING
    assert summary["p99_rejection_ms"] >= summary["median_rejection_ms"] > 0
    assert summary["baseline_completed"] == 2 and summary["baseline_p99_ttft_ms"] > 0
    assert summary["server_rss_before_mib"] > 0 and summary["server_rss_after_mib"] > 0
    _assert_healthy_and_free(server)


def test_the_waiting_token_bound_through_the_server(tiny_llama_dir):
    llm_engine = LLMEngine(EngineArgs(model=tiny_llama_dir, dtype="float32", seed=0, max_num_seqs=1, num_kv_blocks=80))
    engine = AsyncLLMEngine(
        llm_engine, metrics=EngineMetrics(MODEL), log_stats_interval=None,
        admission=AdmissionControl(max_waiting_tokens=40),
    )
    with ServerThread(build_app(engine, served_model_names=[MODEL])) as running:
        url = running.url

        async def main() -> None:
            async with httpx.AsyncClient(timeout=120) as http:
                runner = _body([5] * 5, LONG, stream=True)
                async with http.stream("POST", f"{url}/v1/completions", json=runner) as first:
                    lines = first.aiter_lines()
                    assert (await anext(lines)).startswith("data:")  # running: its tokens no longer count
                    queued = asyncio.create_task(http.post(f"{url}/v1/completions", json=_body([6] * 30, 2)))
                    assert await asyncio.to_thread(wait_for, lambda: engine.admission.waiting_tokens == 30)
                    refused = await http.post(f"{url}/v1/completions", json=_body([7] * 20, 2))
                    assert refused.status_code == 503 and refused.headers["retry-after"]
                    assert "prompt tokens" in refused.json()["error"]["message"]
                    fits = await http.post(f"{url}/v1/completions", json=_body([8] * 10, 2))  # 30 + 10 <= 40
                    async for _ in lines:
                        pass
                    assert fits.status_code == 200 and (await queued).status_code == 200

        asyncio.run(main())
        assert metric(url, "quire:num_requests_rejected_total", {"reason": "waiting_tokens"}) == 1
        running.engine = engine
        _assert_healthy_and_free(running)


def test_a_second_signal_cuts_the_drain_short(tiny_llama_dir, tmp_path):
    log = tmp_path / "serve.log"
    # A drain that would wait ten minutes for the stream in flight, unless a second signal ends it.
    with _quire_serve(tiny_llama_dir, log, "--shutdown-timeout", "600") as (proc, url):
        started = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            stream = pool.submit(_stream_events, url, _body("long", 1000, stream=True), started)
            assert started.wait(60)
            proc.send_signal(signal.SIGTERM)
            assert wait_for(lambda: "draining" in log.read_text(), timeout=30)
            proc.send_signal(signal.SIGTERM)
            events = stream.result(timeout=120)
        assert proc.wait(timeout=60) == 0, log.read_text()
    assert events[-1] == "[DONE]"
    errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
    assert errors and "shut down" in errors[0]["message"], events[-3:]
    assert "again: aborting" in log.read_text()
