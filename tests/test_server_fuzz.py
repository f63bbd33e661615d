"""Hostile input, generated: schemathesis against the server's own ``/openapi.json``.

A real uvicorn server on 127.0.0.1 around the tiny random Llama with a short context (every
generated request is cheap to serve) takes a few hundred generated requests per endpoint, both
schema-valid and schema-violating ones. Every answer must be: no 5xx, each 4xx in OpenAI's error
format, each response and status as the schema says, every schema violation refused. Afterwards
the KV pool is wholly free and ``/health`` is 200. The outcome counts per endpoint are printed.
"""

from __future__ import annotations

import collections
import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from server_utils import ServerThread, wait_for

from quire.config import EngineArgs
from quire.engine.async_engine import AsyncLLMEngine
from quire.engine.llm_engine import LLMEngine
from quire.entrypoints.openai.api_server import build_app
from quire.metrics import EngineMetrics

pytestmark = pytest.mark.slow

MODEL = "tiny"
# Generated requests per endpoint and mode (schema-valid, schema-violating); QUIRE_FUZZ_EXAMPLES overrides.
EXAMPLES = int(os.environ.get("QUIRE_FUZZ_EXAMPLES", "100"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    llm_engine = LLMEngine(
        EngineArgs(model=tiny_llama_dir, dtype="float32", seed=0, max_model_len=48, num_kv_blocks=48, block_size=8)
    )
    engine = AsyncLLMEngine(llm_engine, metrics=EngineMetrics(MODEL), log_stats_interval=None)
    with ServerThread(build_app(engine, served_model_names=[MODEL], request_timeout=20)) as running:
        running.engine = engine
        yield running


def _openai_error(response) -> None:
    if 400 <= response.status_code < 500:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"], error


def test_schemathesis_finds_no_server_error(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {(op.method.upper(), op.path) for op in operations}
    assert {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
            ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/health"), ("GET", "/metrics")} <= paths
    outcomes: dict[str, collections.Counter] = {}
    params: collections.Counter = collections.Counter()  # the fields 400s named
    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"
        counts = outcomes.setdefault(label, collections.Counter())
        # The GET endpoints take no input: nothing to violate.
        modes = [GenerationMode.POSITIVE] if operation.method.upper() == "GET" else list(GenerationMode)
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def run(case) -> None:
                response = case.call(base_url=server.url)
                counts[f"{mode.value} {response.status_code}"] += 1  # noqa: B023 - run() is called right here
                if response.status_code == 400:
                    params[response.json()["error"]["param"]] += 1
                _openai_error(response)
                case.validate_response(response, checks=CHECKS)

            run()
    for label, counts in sorted(outcomes.items()):
        print(f"{label}: {sum(counts.values())} requests, {dict(sorted(counts.items()))}")
    print("400s by param:", dict(params.most_common(12)))
    assert all(sum(c.values()) > 0 for c in outcomes.values())
    # Nothing held: no running or waiting request, every KV block free, and the server healthy.
    def free() -> bool:
        s = server.engine.stats()
        return s["num_free_kv_blocks"] == s["num_kv_blocks"] and s["num_running"] == 0 and s["num_waiting"] == 0

    assert wait_for(free, timeout=60), server.engine.stats()
    assert server.engine.num_in_flight == 0
    assert httpx.get(f"{server.url}/health").status_code == 200
