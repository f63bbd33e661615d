"""Structured outputs and tool calls through a real uvicorn server and the real ``openai`` client.

One server per module on the session's float32 engine, so offline ``LLM`` results come from the
same weights.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest
from server_utils import ServerThread, wait_for

from quire import SamplingParams, StructuredOutputsParams
from quire.engine.async_engine import AsyncLLMEngine
from quire.entrypoints.openai.api_server import build_app

pytestmark = pytest.mark.slow

MODEL = "smol"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,20}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(llm_fp32):
    engine = AsyncLLMEngine(llm_fp32.engine, log_stats_interval=None)
    with ServerThread(build_app(engine, served_model_names=[MODEL])) as running:
        running.engine = engine
        running.llm = llm_fp32
        yield running
    stats = llm_fp32.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"], stats
    assert stats["num_guided_seqs"] == 0, stats


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def offline_chat(server, messages, params):
    llm = server.llm
    return server.engine.run_in_engine_sync(lambda _: llm.chat(messages, params, use_tqdm=False), timeout=300)[0]


def assert_idle(server) -> None:
    def idle() -> bool:
        s = server.engine.stats()
        return s["num_free_kv_blocks"] == s["num_kv_blocks"] and s["num_running"] == 0 and s["num_guided_seqs"] == 0

    assert wait_for(idle, timeout=30), server.engine.stats()


ASK_PERSON = [{"role": "user", "content": "Describe a person in JSON."}]


def test_json_schema_response_format_matches_offline_and_validates(server, client):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    served = client.chat.completions.create(
        model=MODEL, messages=ASK_PERSON, temperature=0, max_tokens=60, response_format=response_format
    )
    content = served.choices[0].message.content
    jsonschema.validate(json.loads(content), PERSON)
    assert served.choices[0].finish_reason == "stop"
    params = SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(json=PERSON))
    assert offline_chat(server, ASK_PERSON, params).outputs[0].text == content


def test_json_object_sampled_with_n(server, client):
    served = client.chat.completions.create(
        model=MODEL,
        messages=ASK_PERSON,
        temperature=1.0,
        seed=3,
        n=3,
        max_tokens=60,
        response_format={"type": "json_object"},
    )
    assert len(served.choices) == 3
    for choice in served.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.finish_reason == "length" and choice.message.content.startswith("{")


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(pattern="^[A-Za-z ]{1,20}$")
    age: int = pydantic.Field(ge=0, le=120)


def test_the_clients_parse_helper_gets_a_validated_object(client):
    parsed = client.chat.completions.parse(
        model=MODEL, messages=ASK_PERSON, temperature=0.7, seed=5, max_tokens=60, response_format=Person
    )
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person), parsed.choices[0].message


def test_streamed_json_schema_concatenates_to_valid_json(client):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    chunks = client.chat.completions.create(
        model=MODEL,
        messages=ASK_PERSON,
        temperature=0.8,
        seed=9,
        max_tokens=60,
        stream=True,
        response_format=response_format,
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_vllm_fields_on_completions(client):
    prompt = "Q: Is the sky blue? A:"
    choice = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=5,
        n=3,
        temperature=1.0,
        seed=1,
        extra_body={"guided_choice": ["yes", "no", "maybe"]},
    )
    assert {c.text for c in choice.choices} <= {"yes", "no", "maybe"}
    phone = r"\d{3}-\d{4}"
    regex = client.completions.create(
        model=MODEL,
        prompt="Call me at",
        max_tokens=12,
        temperature=1.0,
        seed=2,
        extra_body={"structured_outputs": {"regex": phone}},
    )
    assert re.fullmatch(phone, regex.choices[0].text), regex.choices[0].text
    guided = client.completions.create(
        model=MODEL, prompt="A person as JSON:", max_tokens=60, temperature=0, extra_body={"guided_json": PERSON}
    )
    jsonschema.validate(json.loads(guided.choices[0].text), PERSON)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
            "response_format",
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"bogus": 1}}, "structured_outputs"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"response_format": {"type": "json_object"}, "use_beam_search": True, "n": 2}, "response_format"),
    ],
)
def test_bad_structured_outputs_are_400_naming_the_field(server, body, param):
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **body}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=payload, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["message"]
    assert_idle(server)
