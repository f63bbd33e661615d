"""Function calling: tools into the prompt, ``tool_choice`` into a constraint, model text into tool calls.

The model writes a call as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the Hermes
format, which SmolLM2 and Qwen-style templates use). A chat template that renders ``tools`` itself
gets them as Hugging Face's ``apply_chat_template(tools=...)`` argument; for one that does not
(SmolLM2's), the tools and the call format are described in a system message, so both kinds of
template tell the model the same thing.

``tool_choice``: ``"none"`` renders the tools but parses nothing; ``"auto"`` parses calls out of
free text; ``"required"`` constrains the output to a JSON list of ``{"name", "parameters"}`` calls
(one or more, each name one of the tools, its parameters valid for that tool's schema); a named
function constrains the output to that function's arguments (vLLM's shapes for both).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from quire.sampling_params import StructuredOutputsParams

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
_TOOL_CALL = re.compile(re.escape(TOOL_CALL_START) + r"\s*(.*?)\s*(?:" + re.escape(TOOL_CALL_END) + r"|$)", re.DOTALL)
_ANY_OBJECT = {"type": "object"}


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def as_dict(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolChoice:
    """The request's tools (OpenAI's ``{"type": "function", "function": {...}}`` dicts) and its choice.

    ``mode`` is ``"none"``, ``"auto"``, ``"required"`` or ``"named"`` (then ``name`` is the function).
    """

    tools: list[dict]
    mode: str = "auto"
    name: str | None = None
    parallel: bool = True  # more than one call per answer (``parallel_tool_calls``); False: at most one

    @classmethod
    def of(
        cls, tools: list[dict] | None, tool_choice: str | dict | None, parallel: bool = True
    ) -> ToolChoice | None:
        """Check and combine the two fields (``ValueError`` naming ``tools`` or ``tool_choice``); None without tools."""
        if tools is None:
            if tool_choice not in (None, "none"):
                raise ValueError("tool_choice needs tools.")
            return None
        if not tools:
            raise ValueError("tools must not be empty.")
        names = [t["function"]["name"] for t in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tools must have distinct function names, got {names}.")
        if tool_choice is None:
            return cls(tools, parallel=parallel)
        if isinstance(tool_choice, str):
            if tool_choice not in ("none", "auto", "required"):
                raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a function, got {tool_choice!r}.")
            return cls(tools, tool_choice, parallel=parallel)
        name = tool_choice.get("function", {}).get("name")
        if name not in names:
            raise ValueError(f"tool_choice names function {name!r}, which is not in tools ({names}).")
        return cls(tools, "named", name, parallel)

    def parameters(self, name: str) -> dict:
        for tool in self.tools:
            if tool["function"]["name"] == name:
                return tool["function"].get("parameters") or _ANY_OBJECT
        raise KeyError(name)

    # -- the constraint ------------------------------------------------------------------------

    def constraint(self) -> StructuredOutputsParams | None:
        """What ``required`` and a named function force the output to be; None for ``auto`` and ``none``."""
        if self.mode == "named":
            return StructuredOutputsParams(json=self.parameters(self.name))
        if self.mode != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [t["function"]["name"]]},
                    "parameters": t["function"].get("parameters") or _ANY_OBJECT,
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for t in self.tools
        ]
        schema = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema)

    # -- parsing ---------------------------------------------------------------------------------

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a finished output; text that does not parse stays content."""
        if self.mode == "none":
            return text, []
        if self.mode == "named":
            return None, [ToolCall(self.name, text)]
        if self.mode == "required":
            try:
                calls = json.loads(text)
                return None, [ToolCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in calls]
            except (ValueError, TypeError, KeyError):
                return text, []
        return parse_tool_calls(text)

    @property
    def streams_content(self) -> bool:
        """Whether the output may be plain text for the user (``none`` and ``auto``)."""
        return self.mode in ("none", "auto")


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """Hermes-format calls out of free text: (the text outside them or None, the calls)."""
    start = text.find(TOOL_CALL_START)
    if start == -1:
        return text, []
    calls = []
    for match in _TOOL_CALL.finditer(text, start):
        try:
            call = json.loads(match.group(1))
            arguments = call.get("arguments", call.get("parameters", {}))
            calls.append(ToolCall(call["name"], json.dumps(arguments, ensure_ascii=False)))
        except (ValueError, TypeError, KeyError, AttributeError):
            return text, []
    content = text[:start].strip()
    return content or None, calls


# -- the prompt ------------------------------------------------------------------------------------


def template_renders_tools(template: str | dict | None) -> bool:
    """Whether a chat template uses ``tools`` itself (a dict of named templates: any of them)."""
    if isinstance(template, dict):
        return any(template_renders_tools(t) for t in template.values())
    return bool(template) and re.search(r"\btools\b", template) is not None


def conversation_with_tools(conversation: list[dict], tools: list[dict], template_has_tools: bool) -> list[dict]:
    """The conversation to render: for a template without tool support, the tools described in a system
    message and past calls written into their assistant messages in the call format."""
    if template_has_tools:
        return conversation
    rendered = []
    for message in conversation:
        calls = message.get("tool_calls")
        if calls:
            written = "\n".join(_call_text(call) for call in calls)
            message = {k: v for k, v in message.items() if k != "tool_calls"}
            message["content"] = "\n".join(filter(None, [message.get("content"), written]))
        rendered.append(message)
    description = tools_system_prompt(tools)
    if rendered and rendered[0]["role"] in ("system", "developer"):
        first = rendered[0]
        return [{**first, "content": f"{first['content']}\n\n{description}"}, *rendered[1:]]
    return [{"role": "system", "content": description}, *rendered]


def tools_system_prompt(tools: list[dict]) -> str:
    listed = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return (
        "You can call functions. The available functions, with their JSON-schema parameters:\n"
        f"<tools>\n{listed}\n</tools>\n"
        "To call one, answer with only:\n"
        f'{TOOL_CALL_START}{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}{TOOL_CALL_END}'
    )


def _call_text(call: dict) -> str:
    function = call["function"]
    arguments = function.get("arguments") or "{}"
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    body = json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_START}{body}{TOOL_CALL_END}"


def native_tool_calls(conversation: list[dict]) -> list[dict]:
    """For templates that render calls: arguments as dicts (Hugging Face templates' convention)."""
    out = []
    for message in conversation:
        calls = message.get("tool_calls")
        if calls:
            converted = []
            for call in calls:
                arguments = call["function"].get("arguments") or "{}"
                if isinstance(arguments, str):
                    arguments = json.loads(arguments)
                converted.append({**call, "function": {**call["function"], "arguments": arguments}})
            message = {**message, "tool_calls": converted}
        out.append(message)
    return out
