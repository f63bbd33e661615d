"""What completions and chat share: model names, prompt checks, SamplingParams, logprobs, streaming, cancellation."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from fastapi import Request

from quire.engine.async_engine import AsyncLLMEngine
from quire.entrypoints.openai.protocol import APIError, ChatCompletionRequest, CompletionRequest, StreamOptions
from quire.outputs import PositionLogprobs, RequestOutput
from quire.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams

T = TypeVar("T")

logger = logging.getLogger(__name__)

# vLLM's default max_logprobs: the most top logprobs a request may ask for.
MAX_LOGPROBS = 20
# Logprobs of -inf are not JSON; OpenAI-compatible servers clamp them.
_MIN_LOGPROB = -9999.0


# How the engine's ValueErrors start when they are about one field of the request.
_ENGINE_FIELD = re.compile(r"(n|best_of|beam_width)=|(logit_bias|allowed_token_ids|structured_outputs)\b")


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def clamp(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)


def sse(data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


@dataclass
class EnginePrompt:
    text: str | None
    token_ids: list[int]

    def as_engine_input(self) -> dict:
        return {"prompt": self.text, "prompt_token_ids": self.token_ids}


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, served_model_names: list[str], priority_enabled: bool = False) -> None:
        self.engine = engine
        self.served_model_names = served_model_names
        self.priority_enabled = priority_enabled

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # -- checks -------------------------------------------------------------------------------

    def model_name(self, requested: str | None) -> str:
        if requested is None or requested in self.served_model_names:
            return requested or self.served_model_names[0]
        raise APIError(
            f"The model `{requested}` does not exist.", status_code=404, param="model", code="model_not_found"
        )

    def check_unsupported(self, request: CompletionRequest | ChatCompletionRequest) -> None:
        if request.use_beam_search:
            for name in ("stop", "logprobs", "echo", "seed", "logit_bias", "allowed_token_ids", "bad_words"):
                if getattr(request, name, None) not in (None, False):
                    raise APIError(f"{name} is not supported with use_beam_search.", param=name)
            for name, _ in structured_output_sources(request):
                raise APIError(f"{name} is not supported with use_beam_search.", param=name)
        elif request.stream and request.best_of is not None and request.best_of > request.n:
            raise APIError(
                "best_of > n is not supported with stream: the best are known only at the end.", param="best_of"
            )
        if request.priority != 0 and not self.priority_enabled:
            raise APIError(
                f"priority={request.priority} needs --scheduling-policy priority, which is not enabled.",
                param="priority",
            )
        if request.stream_options is not None and not request.stream:
            raise APIError("stream_options is only allowed when stream is true.", param="stream_options")

    def check_prompt(self, prompt: EnginePrompt, max_tokens: int | None, field: str) -> None:
        ids = prompt.token_ids
        if not ids:
            raise APIError(f"{field} is empty: it must contain at least one token.", param=field)
        vocab = self.engine.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise APIError(f"{field} token ids must be integers in [0, {vocab}).", param=field)
        limit = self.engine.max_model_len
        if len(ids) > limit:
            raise APIError(
                f"This model's maximum context length is {limit} tokens. However, your {field} has "
                f"{len(ids)} tokens. Please reduce the length of the {field}.",
                param=field,
            )
        if max_tokens is not None and len(ids) + max_tokens > limit:
            raise APIError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the {field}, {max_tokens} in the completion). "
                f"Please reduce the length of the {field} or completion.",
                param="max_tokens",
            )

    def sampling_params(self, request, fields: dict[str, str] | None = None, **overrides: Any) -> SamplingParams:
        """Build SamplingParams from the request; a ValueError becomes a 400 naming the field.

        ``fields`` maps SamplingParams names to the request's names where they differ.
        """
        values: dict[str, Any] = {
            "n": request.n,
            "best_of": request.best_of,
            "presence_penalty": request.presence_penalty if request.presence_penalty is not None else 0.0,
            "frequency_penalty": request.frequency_penalty if request.frequency_penalty is not None else 0.0,
            "repetition_penalty": request.repetition_penalty if request.repetition_penalty is not None else 1.0,
            "temperature": request.temperature if request.temperature is not None else 1.0,
            "top_p": request.top_p if request.top_p is not None else 1.0,
            "top_k": request.top_k if request.top_k is not None else 0,
            "min_p": request.min_p if request.min_p is not None else 0.0,
            "seed": request.seed,
            "stop": request.stop,
            "stop_token_ids": request.stop_token_ids,
            "ignore_eos": request.ignore_eos,
            "min_tokens": request.min_tokens,
            "include_stop_str_in_output": request.include_stop_str_in_output,
            "skip_special_tokens": request.skip_special_tokens,
            "spaces_between_special_tokens": request.spaces_between_special_tokens,
            "logit_bias": request.logit_bias,
            "allowed_token_ids": request.allowed_token_ids,
            "bad_words": request.bad_words,
            "structured_outputs": structured_outputs(request),
        }
        values.update(overrides)
        try:
            return SamplingParams(**values)
        except (ValueError, TypeError) as exc:
            message = str(exc)
            match = re.match(r"(\w+)", message)
            name = match.group(1) if match else None
            param = (fields or {}).get(name, name) if name in values else None
            raise APIError(message, param=param) from exc

    # -- running requests ---------------------------------------------------------------------

    def beam_search_params(self, request, params: SamplingParams) -> BeamSearchParams | None:
        """For ``use_beam_search``: beams of width ``best_of`` (default ``n``); the ``n`` best are returned."""
        if not request.use_beam_search:
            return None
        try:
            return BeamSearchParams(
                beam_width=params.num_seqs,
                max_tokens=params.max_tokens if params.max_tokens is not None else self.engine.max_model_len,
                ignore_eos=params.ignore_eos,
                temperature=params.temperature,
                length_penalty=request.length_penalty,
                include_stop_str_in_output=params.include_stop_str_in_output,
            )
        except ValueError as exc:
            raise APIError(str(exc), param="length_penalty" if "length_penalty" in str(exc) else None) from exc

    async def add_all(
        self,
        request_id: str,
        prompts: list[EnginePrompt],
        params: SamplingParams,
        priority: int,
        field: str,
        beam: BeamSearchParams | None = None,
        renames: dict[str, str] | None = None,
    ) -> list[AsyncIterator[RequestOutput]]:
        """Add every prompt (all or none); returns one output stream per prompt.

        With ``beam``, each prompt runs a beam search and its stream yields the ``params.n`` best beams.
        ``renames`` maps engine field names to the request's (for the ``param`` of an error).
        """
        arrival = time.time()
        streams, added = [], []
        try:
            for i, prompt in enumerate(prompts):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                engine_params = beam if beam is not None else params
                queue = await self.engine.add_request(rid, prompt.as_engine_input(), engine_params, arrival, priority)
                added.append(rid)
                stream = self.engine.stream(rid, queue)
                streams.append(_first_n(stream, params.n) if beam is not None else stream)
        except BaseException as exc:
            for rid in added:  # all or none: the streams never started, so abort them here
                self.engine.cancel(rid)
            if isinstance(exc, ValueError):
                # The engine names a group size it cannot run as "n=", "best_of=" or "beam_width=", and a
                # token-control field by its name.
                match = _ENGINE_FIELD.match(str(exc))
                name = (match.group(1) or match.group(2)) if match else None
                param = ({"beam_width": "n"} | (renames or {})).get(name, name) if name else field
                raise APIError(str(exc), param=param) from exc
            raise
        return streams


# vLLM's older per-kind fields → the StructuredOutputsParams field each sets.
_GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def structured_output_sources(request) -> list[tuple[str, dict]]:
    """Each structured-output field the request sets: (its name, the StructuredOutputsParams fields it means)."""
    sources: list[tuple[str, dict]] = []
    response_format = request.response_format
    if response_format is not None and response_format.type == "json_object":
        sources.append(("response_format", {"json_object": True}))
    elif response_format is not None and response_format.type == "json_schema":
        spec = response_format.json_schema
        if spec is None or spec.json_schema is None:
            raise APIError("response_format json_schema needs json_schema.schema.", param="response_format")
        sources.append(("response_format", {"json": spec.json_schema}))
    for name, key in _GUIDED_FIELDS.items():
        if getattr(request, name) is not None:
            sources.append((name, {key: getattr(request, name)}))
    if request.structured_outputs is not None:
        sources.append(("structured_outputs", dict(request.structured_outputs)))
    return sources


def structured_outputs(request) -> StructuredOutputsParams | None:
    """The request's one structured-output constraint (None without one); a 400 naming the field when wrong."""
    sources = structured_output_sources(request)
    if not sources:
        return None
    if len(sources) > 1:
        names = ", ".join(name for name, _ in sources)
        raise APIError(f"set at most one of the structured-output fields, got {names}.", param=sources[1][0])
    name, fields = sources[0]
    try:
        return StructuredOutputsParams(**fields)
    except (ValueError, TypeError) as exc:
        raise APIError(str(exc), param=name) from exc


def structured_outputs_field(request) -> str:
    """The name of the request's structured-output field, for errors the engine reports later."""
    sources = structured_output_sources(request)
    return sources[0][0] if sources else "structured_outputs"


class LogprobsBuilder(Protocol):
    """Turns a choice's next tokens and their candidates into the endpoint's logprobs object."""

    def build(self, token_ids: list[int], positions: list[PositionLogprobs | None]) -> dict: ...


class ChoiceText(Protocol):
    """A choice's text as chunk fields when it is not sent as it comes (chat tool calls): one per choice."""

    def delta(self, new_text: str, finished: bool) -> dict | None:
        """The chunk's fields for ``new_text``; None to send nothing for it now."""
        ...

    def finish_reason(self, reason: str | None) -> str | None: ...


@dataclass(frozen=True)
class StreamFormat:
    """How one endpoint spells its stream chunks; everything else is ``stream_chunks``."""

    object: str  # every chunk's "object"
    text: Callable[[str], dict]  # a choice's new text as the chunk's fields: {"text": ...} or {"delta": ...}
    opening: dict | None = None  # the fields of a chunk sent once per choice before any text (chat: the role)
    choice_text: Callable[[], ChoiceText] | None = None  # replaces ``text`` when set: a new one per choice


@dataclass
class _StreamedChoice:
    """What one streamed choice has sent so far."""

    logprobs: LogprobsBuilder | None
    text: ChoiceText | None = None
    sent_text: int = 0
    sent_tokens: int = 0
    started: bool = False
    done: bool = False


async def stream_chunks(
    fmt: StreamFormat,
    request_id: str,
    model: str,
    created: int,
    prompts: list[EnginePrompt],
    streams: list[AsyncIterator[RequestOutput]],
    params: SamplingParams,
    stream_options: StreamOptions | None,
    logprobs: Callable[[EnginePrompt], LogprobsBuilder] | None = None,
    echo: bool = False,
) -> AsyncIterator[str]:
    """The SSE body of a streamed completion or chat completion, ending with ``data: [DONE]``.

    One loop for both endpoints, so that holding back a possible stop string, the usage
    chunks, skipping empty steps and in-band errors behave alike; ``fmt`` says how the
    endpoint spells a chunk. Prompt ``i``'s outputs come from ``streams[i]``; its choice ``j``
    is index ``i * params.n + j``. ``logprobs`` makes one builder per choice (None: the request
    wants none); ``echo`` sends each prompt, and its logprobs, at the head of its choices.
    """
    include_usage = bool(stream_options and stream_options.include_usage)
    continuous = include_usage and bool(stream_options.continuous_usage_stats)
    holdback = stop_holdback(params)
    num_prompt = sum(len(p.token_ids) for p in prompts)
    choices: dict[int, _StreamedChoice] = {}
    generated: dict[int, int] = {}

    def chunk(choice_list: list[dict], usage_now: bool) -> dict:
        data = {"id": request_id, "object": fmt.object, "created": created, "model": model, "choices": choice_list}
        if include_usage:
            data["usage"] = usage(num_prompt, sum(generated.values())) if usage_now else None
        return data

    merged = merge(streams)
    try:
        async for i, output in merged:
            prompt = prompts[i]
            for out in output.outputs:
                index = i * params.n + out.index
                generated[index] = len(out.token_ids)
                state = choices.get(index)
                if state is None:
                    state = choices[index] = _StreamedChoice(
                        logprobs(prompt) if logprobs is not None else None,
                        fmt.choice_text() if fmt.choice_text is not None else None,
                    )
                    if fmt.opening is not None:
                        yield sse(chunk([{"index": index, **fmt.opening}], continuous))
                if state.done:
                    continue
                finished = out.finish_reason is not None
                text = visible_text(out.text, finished, holdback)
                delta = text[state.sent_text :]
                token_ids = out.token_ids[state.sent_tokens :]
                positions = list(out.logprobs[state.sent_tokens :]) if out.logprobs is not None else []
                if echo and not state.started:
                    delta = (prompt.text or "") + delta
                    if state.logprobs is not None:
                        token_ids = output.prompt_token_ids + token_ids
                        positions = list(output.prompt_logprobs or []) + positions
                fields = fmt.text(delta) if state.text is None else state.text.delta(delta, finished)
                if fields is None:  # held back by the choice's text (a tool call being written)
                    state.sent_text = len(text)
                    delta = ""
                    fields = fmt.text("")
                if not (delta or finished or (token_ids and state.logprobs is not None)):
                    continue  # nothing to say yet (a stop string may still be completing)
                choice_logprobs = state.logprobs.build(token_ids, positions) if state.logprobs is not None else None
                state.started = True
                state.sent_text = len(text)
                state.sent_tokens = len(out.token_ids)
                state.done = finished
                choice = {
                    "index": index,
                    **fields,
                    "logprobs": choice_logprobs,
                    "finish_reason": finish_reason(
                        out.finish_reason if state.text is None else state.text.finish_reason(out.finish_reason)
                    ),
                    "stop_reason": out.stop_reason,
                }
                yield sse(chunk([choice], continuous))
        if include_usage:
            yield sse(chunk([], True))
    except Exception as exc:  # noqa: BLE001 - the status line is sent: report in-band
        logger.exception("%s stream %s failed", fmt.object, request_id)
        yield sse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
    finally:
        await merged.aclose()
    yield sse("[DONE]")


async def _first_n(stream: AsyncIterator[RequestOutput], n: int) -> AsyncIterator[RequestOutput]:
    try:
        async for output in stream:
            output.outputs = output.outputs[:n]
            yield output
    finally:
        await stream.aclose()


async def last_output(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async for output in stream:
        last = output
    assert last is not None and last.finished
    return last


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators, yielding ``(which, item)``; closing it cancels them all."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def drain(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
            await queue.put((i, done))
        except Exception as exc:  # noqa: BLE001 - re-raised by the reader
            await queue.put((i, exc))

    tasks = [asyncio.create_task(drain(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnected(raw_request: Request, work: Awaitable[T]) -> T | None:
    """Run ``work``; if the client disconnects first, cancel it (aborting its requests) and return None."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await raw_request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    disconnected = True
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        disconnected = task not in done
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return None if disconnected else task.result()


def visible_text(text: str, finished: bool, holdback: int) -> str:
    """While a stop string could still be completing, keep its possible start out of the stream."""
    if finished or holdback <= 0:
        return text
    return text[: max(0, len(text) - holdback)]


def stop_holdback(params: SamplingParams) -> int:
    if params.include_stop_str_in_output or not params.stop_strings:
        return 0
    return max(len(s) for s in params.stop_strings) - 1


def token_text(tokenizer, token_id: int, position: PositionLogprobs | None) -> str:
    if position is not None and token_id in position and position[token_id].decoded_token is not None:
        return position[token_id].decoded_token
    return tokenizer.decode([token_id])


def top_entries(position: PositionLogprobs, k: int) -> list[tuple[int, Any]]:
    """The ``k`` most likely candidates at a position, by rank."""
    ranked = sorted(position.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
    return [(tid, lp) for tid, lp in ranked if lp.rank is not None and lp.rank <= k][:k]


class CompletionLogprobs:
    """OpenAI's completions logprobs (tokens, token_logprobs, top_logprobs, text_offset), built incrementally."""

    def __init__(self, tokenizer, offset: int) -> None:
        self.tokenizer = tokenizer
        self.offset = offset

    def build(self, token_ids: list[int], positions: list[PositionLogprobs | None]) -> dict:
        tokens, token_logprobs, top, offsets = [], [], [], []
        for tid, position in zip(token_ids, positions, strict=True):
            text = token_text(self.tokenizer, tid, position)
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
            if position is None:
                token_logprobs.append(None)
                top.append(None)
                continue
            token_logprobs.append(clamp(position[tid].logprob))
            ranked = sorted(position.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
            top.append({token_text(self.tokenizer, t, position): clamp(lp.logprob) for t, lp in ranked})
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


class ChatLogprobs:
    """``chat_logprobs`` as a ``LogprobsBuilder`` (chat logprobs need no running state)."""

    def __init__(self, tokenizer, k: int) -> None:
        self.tokenizer = tokenizer
        self.k = k

    def build(self, token_ids: list[int], positions: list[PositionLogprobs]) -> dict:
        return chat_logprobs(self.tokenizer, token_ids, positions, self.k)


def chat_logprobs(tokenizer, token_ids: list[int], positions: list[PositionLogprobs], k: int) -> dict:
    """OpenAI's chat logprobs: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    content = []
    for tid, position in zip(token_ids, positions, strict=True):
        text = token_text(tokenizer, tid, position)
        content.append(
            {
                "token": text,
                "logprob": clamp(position[tid].logprob),
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": (t := token_text(tokenizer, other, position)),
                        "logprob": clamp(lp.logprob),
                        "bytes": list(t.encode("utf-8")),
                    }
                    for other, lp in top_entries(position, k)
                ],
            }
        )
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finish_reason(reason: str | None) -> str | None:
    return None if reason == "abort" else reason
