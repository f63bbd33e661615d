"""``POST /v1/chat/completions``: messages through the model's chat template, streamed (SSE) or not."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from quire.entrypoints.openai.protocol import APIError, ChatCompletionRequest, ChatMessage
from quire.entrypoints.openai.serving_engine import (
    MAX_LOGPROBS,
    EnginePrompt,
    OpenAIServing,
    chat_logprobs,
    finish_reason,
    last_output,
    merge,
    random_id,
    sse,
    stop_holdback,
    until_disconnected,
    usage,
    visible_text,
)
from quire.models.loader import chat_prompt_token_ids
from quire.outputs import RequestOutput
from quire.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Choice:
    sent_text: int = 0
    sent_tokens: int = 0
    done: bool = False


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
        streams = await self.add_all(request_id, [prompt], params, request.priority, "messages", beam)
        created = int(time.time())
        if request.stream:
            body = self._stream(request, request_id, model, created, params, streams[0])
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

    async def _stream(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        model: str,
        created: int,
        params: SamplingParams,
        stream: AsyncIterator[RequestOutput],
    ) -> AsyncIterator[str]:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        continuous = include_usage and bool(request.stream_options.continuous_usage_stats)
        holdback = stop_holdback(params)
        k = request.top_logprobs or 0
        choices: dict[int, _Choice] = {}
        num_prompt = 0
        generated: dict[int, int] = {}

        def chunk(choice: dict) -> dict:
            data = {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [choice],
            }
            if include_usage:
                data["usage"] = usage(num_prompt, sum(generated.values())) if continuous else None
            return data

        merged = merge([stream])
        try:
            async for _, output in merged:
                num_prompt = len(output.prompt_token_ids)
                for out in output.outputs:
                    generated[out.index] = len(out.token_ids)
                    state = choices.get(out.index)
                    if state is None:
                        state = choices[out.index] = _Choice()
                        yield sse(
                            chunk(
                                {
                                    "index": out.index,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            )
                        )
                    if state.done:
                        continue
                    finished = out.finish_reason is not None
                    text = visible_text(out.text, finished, holdback)
                    delta = text[state.sent_text :]
                    token_ids = out.token_ids[state.sent_tokens :]
                    if not (delta or finished or (token_ids and request.logprobs)):
                        continue
                    logprobs = None
                    if request.logprobs:
                        positions = list((out.logprobs or [])[state.sent_tokens :])
                        logprobs = chat_logprobs(self.tokenizer, token_ids, positions, k)
                    state.sent_text, state.sent_tokens, state.done = len(text), len(out.token_ids), finished
                    yield sse(
                        chunk(
                            {
                                "index": out.index,
                                "delta": {"content": delta} if delta else {},
                                "logprobs": logprobs,
                                "finish_reason": finish_reason(out.finish_reason),
                                "stop_reason": out.stop_reason,
                            }
                        )
                    )
            if include_usage:
                yield sse(
                    {
                        "id": request_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage(num_prompt, sum(generated.values())),
                    }
                )
        except Exception as exc:  # noqa: BLE001 - the status line is sent: report in-band
            logger.exception("chat stream %s failed", request_id)
            yield sse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
        finally:
            await merged.aclose()
        yield sse("[DONE]")
