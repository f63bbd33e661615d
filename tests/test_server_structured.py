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


# -- tool calls ------------------------------------------------------------------------------------

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[A-Z][a-z]{2,12}$"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
CLOCK = {
    "type": "object",
    "properties": {"timezone": {"enum": ["UTC", "Europe/Paris", "America/New_York"]}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "description": "Time in a timezone", "parameters": CLOCK}},
]
SCHEMA_OF = {"get_weather": WEATHER, "get_time": CLOCK}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
# A template that renders tools itself (Qwen-like), to check that such templates get them natively.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools you may call\n{%- for tool in tools %}\n"
    "{{ tool['function']['name'] }}: {{ tool['function']['parameters'] | tojson }}{%- endfor %}\n"
    'Reply with <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>\n{%- endif %}'
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "{%- if message.tool_calls %}{%- for call in message.tool_calls %}"
    "\n<tool_call>"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}</tool_call>'
    "{%- endfor %}{%- endif %}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def assert_valid_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function"
        assert call.id
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


def streamed_calls(chunks) -> tuple[dict[int, dict], str, str | None]:
    """(calls by index as {id, name, arguments}, content, finish_reason) accumulated from a stream."""
    calls: dict[int, dict] = {}
    content, reason = "", None
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = entry["id"] or call.id
                entry["name"] += (call.function.name or "") if call.function else ""
                entry["arguments"] += (call.function.arguments or "") if call.function else ""
            reason = choice.finish_reason or reason
    return calls, content, reason


def test_required_tool_choice_gives_valid_calls_streamed_or_not(client):
    kwargs = {
        "model": MODEL,
        "messages": ASK_WEATHER,
        "tools": TOOLS,
        "tool_choice": "required",
        "max_tokens": 80,
        "parallel_tool_calls": False,
    }
    sampled = client.chat.completions.create(temperature=1.0, seed=4, n=3, **kwargs)
    for choice in sampled.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        assert_valid_calls(choice.message.tool_calls)
    greedy = client.chat.completions.create(temperature=0, **kwargs).choices[0]
    calls, content, reason = streamed_calls(client.chat.completions.create(temperature=0, stream=True, **kwargs))
    assert reason == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in greedy.message.tool_calls
    ]


def test_named_tool_choice_forces_that_function(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    kwargs = {"model": MODEL, "messages": ASK_WEATHER, "tools": TOOLS, "tool_choice": named, "max_tokens": 40}
    choice = client.chat.completions.create(temperature=0.9, seed=8, **kwargs).choices[0]
    assert choice.finish_reason == "stop"
    assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]
    assert_valid_calls(choice.message.tool_calls)
    greedy = client.chat.completions.create(temperature=0, **kwargs).choices[0]
    calls, _, reason = streamed_calls(client.chat.completions.create(temperature=0, stream=True, **kwargs))
    assert reason == "stop"
    assert list(calls.values())[0]["name"] == "get_time"
    assert list(calls.values())[0]["arguments"] == greedy.message.tool_calls[0].function.arguments


def test_auto_reads_calls_out_of_the_models_text(client):
    """The model's own text in the call format (steered there by a regex) becomes tool_calls."""
    call_regex = (
        r'<tool_call>\{"name": "get_weather", "arguments": '
        r'\{"city": "[A-Z][a-z]{2,8}", "unit": "celsius"\}\}</tool_call>'
    )
    kwargs = {
        "model": MODEL,
        "messages": ASK_WEATHER,
        "tools": TOOLS,
        "tool_choice": "auto",
        "max_tokens": 60,
        "temperature": 0,
        "extra_body": {"guided_regex": call_regex},
    }
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
    assert_valid_calls(choice.message.tool_calls)
    calls, content, reason = streamed_calls(client.chat.completions.create(stream=True, **kwargs))
    assert reason == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ]


def test_auto_plain_answers_match_offline_chat_with_the_same_tools(server, client):
    messages = [{"role": "user", "content": "Say hello to me."}]
    served = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=24)
    offline = offline_chat(server, messages, SamplingParams(temperature=0, max_tokens=24))
    llm = server.llm
    with_tools = server.engine.run_in_engine_sync(
        lambda _: llm.chat(messages, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False, tools=TOOLS),
        timeout=300,
    )[0]
    assert "get_weather" in with_tools.prompt and "<tools>" in with_tools.prompt  # SmolLM2's template: described
    assert "get_weather" not in offline.prompt
    text = with_tools.outputs[0].text
    message = served.choices[0].message
    if "<tool_call>" in text:
        assert message.tool_calls
    else:
        assert message.content == text and not message.tool_calls
        assert served.choices[0].finish_reason == with_tools.outputs[0].finish_reason


def test_a_template_with_tool_support_renders_them_itself(server, client):
    llm = server.llm
    history = [
        *ASK_WEATHER,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
        {"role": "user", "content": "And the time in Paris?"},
    ]
    rendered = server.engine.run_in_engine_sync(
        lambda _: llm.chat(
            history, SamplingParams(max_tokens=1), use_tqdm=False, tools=TOOLS, chat_template=TOOL_TEMPLATE
        ),
        timeout=300,
    )[0].prompt
    assert "# Tools you may call" in rendered and "<tools>" not in rendered
    assert (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>' in rendered
    )
    fallback = server.engine.run_in_engine_sync(
        lambda _: llm.chat(history, SamplingParams(max_tokens=1), use_tqdm=False, tools=TOOLS), timeout=300
    )[0].prompt
    assert "<tools>" in fallback and '"name": "get_weather"' in fallback
    served = client.chat.completions.create(
        model=MODEL,
        messages=history,
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=80,
        parallel_tool_calls=False,
        extra_body={"chat_template": TOOL_TEMPLATE},
    )
    assert_valid_calls(served.choices[0].message.tool_calls)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": []}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_bad_tool_requests_are_400_naming_the_field(server, body, param):
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **body}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=payload, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.json()
    assert_idle(server)


def test_auto_streams_content_before_a_call_and_none_parses_nothing(client):
    call = r'<tool_call>\{"name": "get_time", "arguments": \{"timezone": "UTC"\}\}</tool_call>'
    kwargs = {
        "model": MODEL,
        "messages": ASK_WEATHER,
        "tools": TOOLS,
        "max_tokens": 60,
        "temperature": 0,
        "extra_body": {"guided_regex": r"Let me check the [a-z]{3,8}\. " + call},
    }
    whole = client.chat.completions.create(tool_choice="auto", **kwargs).choices[0]
    assert whole.finish_reason == "tool_calls"
    assert re.fullmatch(r"Let me check the [a-z]{3,8}\.", whole.message.content), whole.message.content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls] == [
        ("get_time", {"timezone": "UTC"})
    ]
    chunks = list(client.chat.completions.create(tool_choice="auto", stream=True, **kwargs))
    calls, content, reason = streamed_calls(chunks)
    assert reason == "tool_calls" and content.strip() == whole.message.content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_time", {"timezone": "UTC"})]
    assert "<" not in content  # no piece of the call's tag leaked into the streamed text
    plain = client.chat.completions.create(tool_choice="none", **kwargs).choices[0]
    assert plain.finish_reason == "stop" and not plain.message.tool_calls
    assert plain.message.content.endswith("</tool_call>")
