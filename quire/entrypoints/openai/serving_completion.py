"""``POST /v1/completions``: OpenAI's legacy completions, streamed (SSE) or not."""

from __future__ import annotations

import asyncio
import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from quire.entrypoints.openai.protocol import APIError, CompletionRequest
from quire.entrypoints.openai.serving_engine import (
    MAX_LOGPROBS,
    CompletionLogprobs,
    EnginePrompt,
    OpenAIServing,
    StreamFormat,
    finish_reason,
    last_output,
    random_id,
    stream_chunks,
    structured_outputs_field,
    until_disconnected,
    usage,
)
from quire.outputs import RequestOutput

# Completion chunks carry plain text and have the same "object" as the full response.
COMPLETION_STREAM = StreamFormat(object="text_completion", text=lambda delta: {"text": delta})


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
        renames = {"structured_outputs": structured_outputs_field(request)}
        streams = await self.add_all(request_id, prompts, params, request.priority, "prompt", beam, renames)
        created = int(time.time())
        if request.stream:
            body = stream_chunks(
                COMPLETION_STREAM, request_id, model, created, prompts, streams, params, request.stream_options,
                logprobs=(lambda p: self._logprobs(p, request.echo)) if request.logprobs is not None else None,
                echo=request.echo,
            )
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

    def _logprobs(self, prompt: EnginePrompt, echo: bool) -> CompletionLogprobs:
        """A choice's logprobs; ``text_offset`` counts from the returned text's start, where echo puts the prompt."""
        return CompletionLogprobs(self.tokenizer, 0 if echo else len(prompt.text or ""))

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
                    builder = self._logprobs(prompt, request.echo)
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
