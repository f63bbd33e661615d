"""Reading tool calls out of model text and checking tools / tool_choice: pure Python, no model."""

from __future__ import annotations

import json

import pytest

from quire.tool_calls import ToolChoice, conversation_with_tools, parse_tool_calls, template_renders_tools

TOOLS = [
    {"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "b"}},
]


def test_calls_are_read_with_the_text_before_them():
    text = 'Checking. <tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n<tool_call>{"name": "b"}</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Checking."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"x": 1}), ("b", {})]
    assert calls[0].id != calls[1].id


def test_an_unterminated_last_call_still_counts_and_broken_json_stays_text():
    content, calls = parse_tool_calls('<tool_call>{"name": "a", "arguments": {}}')
    assert content is None and [c.name for c in calls] == ["a"]
    broken = '<tool_call>{"name": "a", "arguments": </tool_call>'
    assert parse_tool_calls(broken) == (broken, [])
    assert parse_tool_calls("no calls here") == ("no calls here", [])


def test_required_output_is_a_list_of_calls_and_named_output_is_the_arguments():
    required = ToolChoice.of(TOOLS, "required")
    content, calls = required.parse('[{"name": "b", "parameters": {"y": "z"}}]')
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("b", {"y": "z"})]
    schema = json.loads(required.constraint().json_schema)
    assert schema["minItems"] == 1 and "maxItems" not in schema
    assert json.loads(ToolChoice.of(TOOLS, "required", parallel=False).constraint().json_schema)["maxItems"] == 1
    named = ToolChoice.of(TOOLS, {"type": "function", "function": {"name": "a"}})
    assert json.loads(named.constraint().json_schema) == {"type": "object"}
    assert [(c.name, c.arguments) for c in named.parse('{"k": 2}')[1]] == [("a", '{"k": 2}')]
    assert ToolChoice.of(TOOLS, "auto").constraint() is None


@pytest.mark.parametrize(
    ("tools", "choice", "field"),
    [
        (None, "required", "tool_choice"),
        ([], None, "tools"),
        (TOOLS + TOOLS[:1], None, "tools"),
        (TOOLS, "always", "tool_choice"),
        (TOOLS, {"type": "function", "function": {"name": "c"}}, "tool_choice"),
    ],
)
def test_bad_tool_settings_name_the_field(tools, choice, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        ToolChoice.of(tools, choice)


def test_tools_go_into_the_system_message_of_a_template_without_them():
    assert not template_renders_tools("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert template_renders_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "a", "arguments": '{"x": 1}'}}]},
    ]
    rendered = conversation_with_tools(conversation, TOOLS, template_has_tools=False)
    assert rendered[0]["content"].startswith("Be brief.") and '"name": "a"' in rendered[0]["content"]
    assert rendered[1]["content"] == '<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>'
    assert "tool_calls" not in rendered[1]
