"""``POST /v1/completions``: OpenAI's legacy completions, streamed (SSE) or not."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from quire.entrypoints.openai.protocol import APIError, CompletionRequest
from quire.entrypoints.openai.serving_engine import (
    MAX_LOGPROBS,
    CompletionLogprobs,
    EnginePrompt,
    OpenAIServing,
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
from quire.outputs import RequestOutput
from quire.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Choice:
    """What one streamed choice has sent so far."""

    logprobs: CompletionLogprobs | None
    sent_text: int = 0
    sent_tokens: int = 0
    started: bool = False
    done: bool = False


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Response:
        model = self.model_name(request.model)
        self.check_unsupported(request)
        if request.suffix is not None:
            raise APIError("suffix is not supported.", param="suffix")
        if request.logprobs is not None and request.logprobs > MAX_LOGPROBS:
            raise APIError(f"logprobs must be <= {MAX_LOGPROBS}, got {request.logprobs}.", param="logprobs")
        prompts = self._prompts(request.prompt, request.echo)
        for prompt in prompts:
            self.check_prompt(prompt, request.max_tokens, "prompt")
        params = self.sampling_params(
            request,
            max_tokens=request.max_tokens,
            logprobs=request.logprobs,
            prompt_logprobs=request.logprobs if request.echo else None,
        )
        request_id = random_id("cmpl")
        beam = self.beam_search_params(request, params)
        streams = await self.add_all(request_id, prompts, params, request.priority, "prompt", beam)
        created = int(time.time())
        if request.stream:
            body = self._stream(request, request_id, model, created, prompts, params, streams)
            return StreamingResponse(body, media_type="text/event-stream")
        finals = await until_disconnected(raw_request, asyncio.gather(*(last_output(s) for s in streams)))
        if finals is None:
            return Response(status_code=499)
        return JSONResponse(self._response(request, request_id, model, created, prompts, finals))

    def _prompts(self, prompt, echo: bool) -> list[EnginePrompt]:
        tokenizer = self.tokenizer
        if isinstance(prompt, str):
            items: list = [prompt]
        elif not prompt:
            raise APIError("prompt must not be empty.", param="prompt")
        elif isinstance(prompt[0], int):
            items = [prompt]
        else:
            items = list(prompt)
        out = []
        for item in items:
            if isinstance(item, str):
                out.append(EnginePrompt(item, tokenizer.encode(item, add_special_tokens=True)))
            else:
                ids = list(item)
                self.check_prompt(EnginePrompt(None, ids), None, "prompt")
                out.append(EnginePrompt(tokenizer.decode(ids) if echo else None, ids))
        return out

    # -- one JSON response --------------------------------------------------------------------

    def _response(self, request, request_id, model, created, prompts, finals: list[RequestOutput]) -> dict:
        choices = []
        num_generated = 0
        for i, (prompt, final) in enumerate(zip(prompts, finals, strict=True)):
            for out in final.outputs:
                num_generated += len(out.token_ids)
                text = out.text
                logprobs = None
                if request.echo:
                    text = (prompt.text or "") + text
                if request.logprobs is not None:
                    builder = CompletionLogprobs(self.tokenizer, 0 if request.echo else len(prompt.text or ""))
                    if request.echo:
                        token_ids = final.prompt_token_ids + out.token_ids
                        positions = list(final.prompt_logprobs or []) + list(out.logprobs or [])
                    else:
                        token_ids, positions = out.token_ids, list(out.logprobs or [])
                    logprobs = builder.build(token_ids, positions)
                choices.append(
                    {
                        "index": i * request.n + out.index,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": finish_reason(out.finish_reason),
                        "stop_reason": out.stop_reason,
                    }
                )
        num_prompt = sum(len(f.prompt_token_ids) for f in finals)
        return {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage(num_prompt, num_generated),
            "system_fingerprint": None,
        }

    # -- server-sent events -------------------------------------------------------------------

    async def _stream(
        self,
        request: CompletionRequest,
        request_id: str,
        model: str,
        created: int,
        prompts: list[EnginePrompt],
        params: SamplingParams,
        streams: list[AsyncIterator[RequestOutput]],
    ) -> AsyncIterator[str]:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        continuous = include_usage and bool(request.stream_options.continuous_usage_stats)
        holdback = stop_holdback(params)
        choices: dict[int, _Choice] = {}
        generated: dict[int, int] = {}
        prompt_len = {i: len(p.token_ids) for i, p in enumerate(prompts)}

        def chunk(choice: dict) -> dict:
            data = {
                "id": request_id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [choice],
            }
            if include_usage:
                data["usage"] = usage(sum(prompt_len.values()), sum(generated.values())) if continuous else None
            return data

        merged = merge(streams)
        try:
            async for i, output in merged:
                prompt = prompts[i]
                for out in output.outputs:
                    index = i * request.n + out.index
                    generated[index] = len(out.token_ids)
                    state = choices.get(index)
                    if state is None:
                        builder = None
                        if request.logprobs is not None:
                            builder = CompletionLogprobs(self.tokenizer, 0 if request.echo else len(prompt.text or ""))
                        state = choices[index] = _Choice(builder)
                    if state.done:
                        continue
                    finished = out.finish_reason is not None
                    text = visible_text(out.text, finished, holdback)
                    delta = text[state.sent_text :]
                    token_ids = out.token_ids[state.sent_tokens :]
                    positions = list(out.logprobs[state.sent_tokens :]) if out.logprobs is not None else []
                    if not state.started and request.echo:
                        delta = (prompt.text or "") + delta
                        if state.logprobs is not None:
                            token_ids = output.prompt_token_ids + token_ids
                            positions = list(output.prompt_logprobs or []) + positions
                    if not (delta or finished or (token_ids and state.logprobs is not None)):
                        continue
                    logprobs = state.logprobs.build(token_ids, positions) if state.logprobs is not None else None
                    state.started = True
                    state.sent_text = len(text)
                    state.sent_tokens = len(out.token_ids)
                    state.done = finished
                    yield sse(
                        chunk(
                            {
                                "index": index,
                                "text": delta,
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
                        "object": "text_completion",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage(sum(prompt_len.values()), sum(generated.values())),
                    }
                )
        except Exception as exc:  # noqa: BLE001 - the status line is sent: report in-band
            logger.exception("completion stream %s failed", request_id)
            yield sse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
        finally:
            await merged.aclose()
        yield sse("[DONE]")
