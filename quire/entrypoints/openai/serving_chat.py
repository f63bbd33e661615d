"""``POST /v1/chat/completions``: messages through the model's chat template, streamed (SSE) or not."""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from quire.entrypoints.openai.protocol import APIError, ChatCompletionRequest, ChatMessage
from quire.entrypoints.openai.serving_engine import (
    ChatLogprobs,
    EnginePrompt,
    OpenAIServing,
    StreamFormat,
    chat_logprobs,
    finish_reason,
    last_output,
    random_id,
    stream_chunks,
    until_disconnected,
    usage,
)
from quire.models.loader import chat_prompt_token_ids
from quire.outputs import RequestOutput

# Chat chunks carry a delta; each choice opens with the assistant role, as OpenAI's do.
CHAT_STREAM = StreamFormat(
    object="chat.completion.chunk",
    text=lambda delta: {"delta": {"content": delta} if delta else {}},
    opening={"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
)


def apply_chat_template(
    tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True, chat_template: str | None = None
) -> EnginePrompt:
    """The prompt ``LLM.chat`` would build for the same conversation (same template, same tokens)."""
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        token_ids = chat_prompt_token_ids(tokenizer, conversation, add_generation_prompt, chat_template)
    except Exception as exc:  # noqa: BLE001 - a template error is the request's fault
        raise APIError(f"could not apply the chat template: {exc}", param="messages") from exc
    return EnginePrompt(tokenizer.decode(token_ids), token_ids)


class OpenAIServingChat(OpenAIServing):
    def __init__(self, *args, trust_request_chat_template: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # A Jinja template is code: an untrusted one can loop for minutes inside the sandbox.
        self.trust_request_chat_template = trust_request_chat_template

    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        model = self.model_name(request.model)
        self.check_unsupported(request)
        top_logprobs = request.top_logprobs
        if request.chat_template is not None and not self.trust_request_chat_template:
            raise APIError(
                "chat_template in a request needs the server to run with --trust-request-chat-template.",
                param="chat_template",
            )
        if top_logprobs is not None and not request.logprobs:
            raise APIError("top_logprobs needs logprobs set to true.", param="top_logprobs")
        max_field = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        prompt = apply_chat_template(
            self.tokenizer, request.messages, request.add_generation_prompt, request.chat_template
        )
        try:
            self.check_prompt(prompt, max_tokens, "messages")
        except APIError as exc:
            if exc.param == "max_tokens":
                exc.param = max_field
            raise
        params = self.sampling_params(
            request,
            fields={"max_tokens": max_field, "logprobs": "top_logprobs"},
            max_tokens=max_tokens,
            logprobs=(top_logprobs or 0) if request.logprobs else None,
        )
        request_id = random_id("chatcmpl")
        beam = self.beam_search_params(request, params)
        timeout = self.timeout(request)
        streams = await self.add_all(request_id, [prompt], params, request.priority, "messages", beam, timeout)
        created = int(time.time())
        if request.stream:
            k = request.top_logprobs or 0
            body = stream_chunks(
                CHAT_STREAM, request_id, model, created, [prompt], streams, params, request.stream_options,
                logprobs=(lambda _: ChatLogprobs(self.tokenizer, k)) if request.logprobs else None,
            )
            return StreamingResponse(body, media_type="text/event-stream")
        final = await until_disconnected(raw_request, last_output(streams[0]))
        if final is None:
            return Response(status_code=499)
        return JSONResponse(self._response(request, request_id, model, created, final))

    def _response(self, request, request_id, model, created, final: RequestOutput) -> dict:
        k = request.top_logprobs or 0
        choices = [
            {
                "index": out.index,
                "message": {"role": "assistant", "content": out.text},
                "logprobs": chat_logprobs(self.tokenizer, out.token_ids, out.logprobs or [], k)
                if request.logprobs
                else None,
                "finish_reason": finish_reason(out.finish_reason),
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
