"""``POST /v1/chat/completions``: messages through the model's chat template, streamed (SSE) or not.

With ``tools``, the output is read into OpenAI ``tool_calls`` (``quire.tool_calls``); streamed, plain
text goes out as it comes and a call goes out once its text is complete (a named function's
arguments stream as they come).
"""

from __future__ import annotations

import dataclasses
import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from quire.entrypoints.openai.protocol import APIError, ChatCompletionRequest, ChatMessage
from quire.entrypoints.openai.serving_engine import (
    MAX_LOGPROBS,
    ChatLogprobs,
    EnginePrompt,
    OpenAIServing,
    StreamFormat,
    chat_logprobs,
    finish_reason,
    last_output,
    random_id,
    stream_chunks,
    structured_output_sources,
    structured_outputs_field,
    until_disconnected,
    usage,
)
from quire.models.loader import chat_prompt_token_ids
from quire.outputs import CompletionOutput, RequestOutput
from quire.tool_calls import TOOL_CALL_START, ToolCall, ToolChoice

# Chat chunks carry a delta; each choice opens with the assistant role, as OpenAI's do.
CHAT_STREAM = StreamFormat(
    object="chat.completion.chunk",
    text=lambda delta: {"delta": {"content": delta} if delta else {}},
    opening={"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
)


def apply_chat_template(
    tokenizer,
    messages: list[ChatMessage],
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    tools: list[dict] | None = None,
) -> EnginePrompt:
    """The prompt ``LLM.chat`` would build for the same conversation (same template, same tokens)."""
    conversation = [m.as_template_message() for m in messages]
    try:
        token_ids = chat_prompt_token_ids(tokenizer, conversation, add_generation_prompt, chat_template, tools)
    except Exception as exc:  # noqa: BLE001 - a template error is the request's fault
        raise APIError(f"could not apply the chat template: {exc}", param="messages") from exc
    return EnginePrompt(tokenizer.decode(token_ids), token_ids)


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        model = self.model_name(request.model)
        self.check_unsupported(request)
        top_logprobs = request.top_logprobs
        if top_logprobs is not None:
            if not request.logprobs:
                raise APIError("top_logprobs needs logprobs set to true.", param="top_logprobs")
            if not 0 <= top_logprobs <= MAX_LOGPROBS:
                message = f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {top_logprobs}."
                raise APIError(message, param="top_logprobs")
        max_field = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        tools = self._tool_choice(request)
        prompt = apply_chat_template(
            self.tokenizer,
            request.messages,
            request.add_generation_prompt,
            request.chat_template,
            tools.tools if tools is not None else None,
        )
        try:
            self.check_prompt(prompt, max_tokens, "messages")
        except APIError as exc:
            if exc.param == "max_tokens":
                exc.param = max_field
            raise
        overrides = {}
        constraint = tools.constraint() if tools is not None else None
        if constraint is not None:
            overrides["structured_outputs"] = constraint
        params = self.sampling_params(
            request,
            fields={"max_tokens": max_field, "logprobs": "top_logprobs"},
            max_tokens=max_tokens,
            logprobs=(top_logprobs or 0) if request.logprobs else None,
            **overrides,
        )
        request_id = random_id("chatcmpl")
        beam = self.beam_search_params(request, params)
        renames = {"structured_outputs": "tool_choice" if constraint is not None else structured_outputs_field(request)}
        streams = await self.add_all(request_id, [prompt], params, request.priority, "messages", beam, renames)
        created = int(time.time())
        if request.stream:
            k = request.top_logprobs or 0
            fmt = CHAT_STREAM
            if tools is not None:
                fmt = dataclasses.replace(CHAT_STREAM, choice_text=lambda: ToolCallStream(tools))
            body = stream_chunks(
                fmt, request_id, model, created, [prompt], streams, params, request.stream_options,
                logprobs=(lambda _: ChatLogprobs(self.tokenizer, k)) if request.logprobs else None,
            )
            return StreamingResponse(body, media_type="text/event-stream")
        final = await until_disconnected(raw_request, last_output(streams[0]))
        if final is None:
            return Response(status_code=499)
        return JSONResponse(self._response(request, request_id, model, created, final, tools))

    @staticmethod
    def _tool_choice(request: ChatCompletionRequest) -> ToolChoice | None:
        tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools is not None else None
        choice = request.tool_choice
        try:
            tool_choice = ToolChoice.of(
                tools,
                choice.model_dump() if hasattr(choice, "model_dump") else choice,
                parallel=request.parallel_tool_calls is not False,
            )
        except ValueError as exc:
            param = "tool_choice" if str(exc).startswith("tool_choice") else "tools"
            raise APIError(str(exc), param=param) from exc
        if tool_choice is not None and tool_choice.mode in ("required", "named"):
            if request.use_beam_search:
                raise APIError("tool_choice 'required' or a named function is not supported with use_beam_search.",
                               param="tool_choice")
            for name, _ in structured_output_sources(request):
                raise APIError(f"tool_choice={request.tool_choice!r} cannot be combined with {name}.", param=name)
        return tool_choice

    def _response(self, request, request_id, model, created, final: RequestOutput, tools: ToolChoice | None) -> dict:
        k = request.top_logprobs or 0
        choices = [
            {
                "index": out.index,
                **_message(out, tools),
                "logprobs": chat_logprobs(self.tokenizer, out.token_ids, out.logprobs or [], k)
                if request.logprobs
                else None,
                "stop_reason": out.stop_reason,
            }
            for out in final.outputs
        ]
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage(len(final.prompt_token_ids), sum(len(o.token_ids) for o in final.outputs)),
            "system_fingerprint": None,
        }


def _message(out: CompletionOutput, tools: ToolChoice | None) -> dict:
    """A finished choice's ``message`` and ``finish_reason``: its text, or the tool calls read out of it."""
    reason = finish_reason(out.finish_reason)
    if tools is None:
        return {"message": {"role": "assistant", "content": out.text}, "finish_reason": reason}
    content, calls = tools.parse(out.text)
    message: dict = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [call.as_dict() for call in calls]
    return {"message": message, "finish_reason": _tool_finish_reason(tools, calls, reason)}


def _tool_finish_reason(tools: ToolChoice, calls: list[ToolCall], reason: str | None) -> str | None:
    """OpenAI's: "tool_calls" when the model chose to call (a named function forced by the request: "stop")."""
    return "tool_calls" if calls and reason == "stop" and tools.mode != "named" else reason


class ToolCallStream:
    """One streamed choice of a request with tools: content as it comes, calls as chat deltas.

    ``auto``/``none``: text goes out until a call may be starting (``<tool_call>`` or a prefix of it at
    the end), then waits for the end; ``required``: everything waits for the end (a JSON list);
    a named function: its arguments stream as they come, in the one call's ``function.arguments``.
    """

    def __init__(self, tools: ToolChoice) -> None:
        self.tools = tools
        self.text = ""
        self.sent = 0  # characters of ``text`` sent as content (or as arguments)
        self.calls: list[ToolCall] = []
        self.named_call = ToolCall(tools.name, "") if tools.mode == "named" else None

    def delta(self, new_text: str, finished: bool) -> dict | None:
        self.text += new_text
        if self.named_call is not None:
            return self._named(new_text)
        if self.tools.mode == "none":
            return {"delta": {"content": new_text} if new_text else {}}
        if not finished:
            ready = self._safe_length() if self.tools.streams_content else 0
            piece, self.sent = self.text[self.sent : ready], max(self.sent, ready)
            return {"delta": {"content": piece}} if piece else None
        content, self.calls = self.tools.parse(self.text)
        delta: dict = {}
        if not self.calls:
            rest = self.text[self.sent :]
            if rest:
                delta["content"] = rest
        else:
            delta["tool_calls"] = [{"index": i, **call.as_dict()} for i, call in enumerate(self.calls)]
        return {"delta": delta}

    def _named(self, new_text: str) -> dict | None:
        call = self.named_call
        assert call is not None
        if self.sent == 0 and not self.calls:
            self.calls = [call]
            self.sent = len(self.text)
            head = {**call.as_dict(), "index": 0}
            head["function"]["arguments"] = new_text
            return {"delta": {"tool_calls": [head]}}
        self.sent = len(self.text)
        if not new_text:
            return {"delta": {}}
        return {"delta": {"tool_calls": [{"index": 0, "function": {"arguments": new_text}}]}}

    def _safe_length(self) -> int:
        """How much of the text is surely content: up to a call's start, or short of a possible one."""
        start = self.text.find(TOOL_CALL_START)
        if start != -1:
            return start
        for keep in range(min(len(TOOL_CALL_START) - 1, len(self.text)), 0, -1):
            if TOOL_CALL_START.startswith(self.text[-keep:]):
                return len(self.text) - keep
        return len(self.text)

    def finish_reason(self, reason: str | None) -> str | None:
        return _tool_finish_reason(self.tools, self.calls, reason)
