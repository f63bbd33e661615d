"""The server under KV pressure, with an API key, after an engine failure, and as `quire serve` + `quire bench serve`.

These run on the tiny random Llama (fast steps, so many requests fit in a few seconds) with a
KV pool far smaller than the load, so requests are preempted and recomputed all the time.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from server_utils import ServerThread, metric, wait_for

import quire
from quire import SamplingParams
from quire.config import EngineArgs
from quire.engine.async_engine import AsyncLLMEngine
from quire.engine.llm_engine import LLMEngine
from quire.entrypoints.cli import main as cli_main
from quire.entrypoints.openai.api_server import build_app
from quire.metrics import EngineMetrics

pytestmark = pytest.mark.slow

MODEL = "tiny"
NUM_KV_BLOCKS = 12  # 192 tokens for everything in flight: heavy preemption


def _engine(path: str, **kwargs) -> LLMEngine:
    return LLMEngine(EngineArgs(model=path, dtype="float32", seed=0, **kwargs))


@pytest.fixture(scope="module")
def pressured(tiny_llama_dir):
    engine = AsyncLLMEngine(
        _engine(tiny_llama_dir, num_kv_blocks=NUM_KV_BLOCKS, max_num_batched_tokens=128),
        metrics=EngineMetrics(MODEL),
        log_stats_interval=None,
    )
    with ServerThread(build_app(engine, served_model_names=[MODEL], api_key="sekret")) as server:
        server.engine = engine
        yield server


def _headers(key: str = "sekret") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _pool_free(server) -> bool:
    s = server.engine.stats()
    return s["num_free_kv_blocks"] == s["num_kv_blocks"] and s["num_running"] == 0 and s["num_waiting"] == 0


def test_api_key_is_enforced(pressured):
    url = pressured.url
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
    for headers in ({}, _headers("wrong"), {"Authorization": "sekret"}):
        response = httpx.post(f"{url}/v1/completions", json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.post(f"{url}/tokenize", json={"prompt": "x"}).status_code == 401
    assert httpx.post(f"{url}/v1/completions", json=body, headers=_headers()).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200  # probes and scrapers need no key
    assert httpx.get(f"{url}/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0)
    assert good.completions.create(model=MODEL, prompt="hi", max_tokens=3).usage.completion_tokens == 3


def test_soak_under_kv_pressure(pressured):
    """Mixed lengths, n, priorities and cancellations; every request is accounted for, nothing leaked."""
    url = pressured.url
    limit = pressured.engine.max_model_len
    rng = random.Random(1)
    max_requests = 48  # a fixed count, not a deadline: what finishes must not depend on the machine's speed
    counts = {"done": 0, "cancelled": 0, "rejected": 0}
    preemptions_before = metric(url, "quire:num_preemptions_total")

    async def one(http: httpx.AsyncClient, i: int) -> None:
        prompt_len = rng.randint(1, 120)
        max_tokens = rng.randint(1, limit - prompt_len)
        body = {
            "model": MODEL, "prompt": [rng.randrange(1, 1000) for _ in range(prompt_len)], "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": rng.choice([0.0, 1.0]), "seed": i,
        }
        kind = rng.random()
        if kind < 0.1:
            body["n"] = 2
        elif kind < 0.2:
            body["priority"] = rng.choice([-1, 1])
        stream = rng.random() < 0.6
        cancel_after = rng.randint(0, 6) if rng.random() < 0.3 else None
        body["stream"] = stream
        if stream:
            body["stream_options"] = {"include_usage": True}
        if cancel_after is not None and not stream:
            try:
                await http.post(f"{url}/v1/completions", json=body, headers=_headers(), timeout=rng.uniform(0.05, 1))
            except httpx.TimeoutException:
                counts["cancelled"] += 1
                return
            counts["done"] += 1
            return
        async with http.stream("POST", f"{url}/v1/completions", json=body, headers=_headers()) as response:
            if response.status_code == 400:
                error = json.loads(await response.aread())["error"]
                assert error["param"] in ("n", "priority"), error
                counts["rejected"] += 1
                return
            assert response.status_code == 200, await response.aread()
            if not stream:
                data = json.loads(await response.aread())
                assert data["usage"]["completion_tokens"] == max_tokens * len(data["choices"])
                assert all(c["finish_reason"] == "length" for c in data["choices"])
                counts["done"] += 1
                return
            chunks, usage, reasons = 0, None, []
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                assert "error" not in event, event
                chunks += 1
                usage = event.get("usage") or usage
                reasons += [c["finish_reason"] for c in event["choices"] if c["finish_reason"]]
                if cancel_after is not None and chunks >= cancel_after:
                    counts["cancelled"] += 1
                    return
            assert usage["completion_tokens"] == max_tokens * body.get("n", 1)
            assert usage["prompt_tokens"] == prompt_len
            assert reasons == ["length"] * body.get("n", 1)
            counts["done"] += 1

    async def worker(http: httpx.AsyncClient, ids) -> None:
        for i in ids:
            await one(http, i)

    async def main() -> None:
        ids = iter(range(max_requests))
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as http:
            await asyncio.gather(*(worker(http, ids) for _ in range(16)))

    asyncio.run(main())
    print("soak:", counts)
    assert sum(counts.values()) == max_requests, counts
    assert counts["done"] >= 10, counts
    assert counts["cancelled"] >= 5, counts
    assert metric(url, "quire:num_preemptions_total") > preemptions_before  # the pool really was too small
    assert wait_for(lambda: _pool_free(pressured), timeout=30), pressured.engine.stats()
    assert metric(url, "quire:kv_cache_usage_perc") == 0
    assert metric(url, "quire:num_requests_running") == 0
    assert httpx.get(f"{url}/health").status_code == 200


def test_unread_requests_are_aborted(pressured):
    """A request whose output queue is dropped unread (a response that never started) is aborted."""
    engine = pressured.engine
    before = engine.stats()["num_generated_tokens"]
    params = SamplingParams(max_tokens=170, ignore_eos=True)

    async def add_and_drop() -> None:
        await engine.add_request("orphan", [5] * 10, params)
        stream = engine.stream("orphan-2", await engine.add_request("orphan-2", [6] * 10, params))
        del stream  # created, never iterated

    asyncio.run_coroutine_threadsafe(add_and_drop(), engine._loop).result(timeout=30)
    assert wait_for(lambda: _pool_free(pressured), timeout=30), engine.stats()
    assert engine.stats()["num_generated_tokens"] - before < 2 * 170
    assert engine.run_in_engine_sync(lambda e: dict(e.requests)) == {}


def test_engine_failure_fails_requests_and_health(tiny_llama_dir):
    llm_engine = _engine(tiny_llama_dir, num_kv_blocks=16)
    real_step, calls = llm_engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("boom: simulated kernel failure")
        return real_step()

    llm_engine.step = failing_step
    engine = AsyncLLMEngine(llm_engine, metrics=EngineMetrics(MODEL), log_stats_interval=None)
    with ServerThread(build_app(engine, served_model_names=[MODEL])) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 50, "ignore_eos": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            events = [line for line in response.iter_lines() if line.startswith("data:")]
        assert "boom" in events[-2] and '"error"' in events[-2]
        assert events[-1] == "data: [DONE]"
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 500
        assert "boom" in health.json()["error"]["message"]
        refused = httpx.post(f"{server.url}/v1/completions", json=body)
        assert refused.status_code == 500 and refused.json()["error"]["type"] == "server_error"


def test_cli_rejects_bad_engine_arguments_before_loading(capsys):
    assert cli_main(["serve", "--priority-aging-steps", "0"]) == 2
    assert "priority_aging_steps" in capsys.readouterr().err
    assert cli_main(["serve", "--swap-space", "-1"]) == 2
    assert "swap_space" in capsys.readouterr().err
    assert cli_main(["serve", "a.gguf", "--model", "b.gguf"]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_quire_serve_and_bench_serve(tiny_llama_dir, tmp_path):
    port = _free_port()
    root = str(Path(quire.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115
    cmd = [
        sys.executable, "-m", "quire.entrypoints.cli", "serve", tiny_llama_dir, "--port", str(port),
        "--dtype", "float32", "--num-kv-blocks", "64", "--served-model-name", "tiny", "t2",
        "--log-stats-interval", "0.2", "--api-key", "k", "--swap-space", "1", "--scheduling-policy", "priority",
        "--preemption-mode", "swap",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(Path(log.name).read_text())
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        assert wait_for(up, timeout=180, interval=0.5)
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer k"}).json()
        assert [m["id"] for m in models["data"]] == ["tiny", "t2"]
        result = tmp_path / "bench.json"
        code = cli_main([
            "bench", "serve", "--base-url", url, "--api-key", "k", "--num-prompts", "8", "--dataset", "alpaca-like",
            "--request-rate", "50", "--burstiness", "0.5", "--max-output-len", "12", "--ignore-eos",
            "--max-concurrency", "4", "--result-json", str(result), "--results-dir", str(tmp_path),
        ])
        assert code == 0
        summary = json.loads(result.read_text())
        assert summary["completed"] == 8 and summary["failed"] == 0
        assert summary["total_output_tokens"] > 0 and summary["total_input_tokens"] > 0
        assert summary["mean_ttft_ms"] > 0 and summary["p99_e2el_ms"] >= summary["median_e2el_ms"] > 0
        assert (tmp_path / "serve.png").exists()
        chat = subprocess.run(
            [sys.executable, "-m", "quire.entrypoints.cli", "bench", "serve", "--base-url", url, "--api-key", "k",
             "--endpoint", "/v1/chat/completions", "--num-prompts", "3", "--dataset", "random",
             "--random-input-len", "20", "--random-output-len", "6", "--ignore-eos", "--results-dir", str(tmp_path)],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert chat.returncode == 0, chat.stderr
        assert re.search(r"Successful requests:\s+3\s", chat.stdout), chat.stdout
        assert "Mean ITL (ms):" in chat.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        output = Path(log.name).read_text()
        log.close()
    assert "Avg prompt throughput:" in output, output


def test_priority_and_swap_through_the_server(tiny_llama_dir):
    """`priority` in request bodies, swap preemption, and the swapped-request and host-cache metrics."""
    llm_engine = _engine(
        tiny_llama_dir, num_kv_blocks=NUM_KV_BLOCKS, num_host_kv_blocks=64, max_num_batched_tokens=128,
        scheduling_policy="priority", preemption_mode="swap",
    )
    engine = AsyncLLMEngine(llm_engine, metrics=EngineMetrics(MODEL), log_stats_interval=None)
    with ServerThread(build_app(engine, served_model_names=[MODEL])) as server:
        server.engine = engine
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        async def main():
            results = await asyncio.gather(*(
                client.completions.create(
                    model=MODEL, prompt=[(7 * i + j) % 900 + 1 for j in range(20 + 3 * i)], max_tokens=40,
                    n=1 + i % 2, seed=i, temperature=1.0, extra_body={"ignore_eos": True, "priority": i % 3},
                )
                for i in range(10)
            ))
            return results

        results = asyncio.run(main())
        assert all(c.finish_reason == "length" for r in results for c in r.choices)
        assert [len(r.choices) for r in results] == [1 + i % 2 for i in range(10)]
        stats = llm_engine.stats()
        assert stats["num_swapped_out_blocks"] > 0 and stats["num_preemptions_swap"] > 0, stats
        assert wait_for(lambda: _pool_free(server), timeout=30), engine.stats()
        assert llm_engine.stats()["num_free_host_blocks"] == 64
        assert metric(server.url, "quire:cpu_cache_usage_perc") == 0
        assert metric(server.url, "quire:num_requests_swapped") == 0
        assert metric(server.url, "quire:num_preemptions_total") >= stats["num_preemptions_swap"]
