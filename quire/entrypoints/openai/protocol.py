"""Request models for the OpenAI-compatible API, and OpenAI's error body.

Requests are pydantic models with unknown fields forbidden, so a misspelt or unsupported
argument is a 400 naming it rather than being silently ignored. The fields are OpenAI's plus
the extras vLLM accepts in the body (``top_k``, ``min_p``, ``repetition_penalty``, ...), with
vLLM's defaults. Responses are plain dicts in OpenAI's shapes (built in ``serving_*``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from quire.entrypoints.openai.limits import (
    MAX_LOGPROBS,
    MAX_N,
    MAX_PROMPTS,
    MAX_REQUEST_TIMEOUT_S,
    MAX_SEED,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MIN_SEED,
)


class OpenAIBaseModel(BaseModel):
    # NaN and infinities are not JSON numbers (Python's parser takes them); strict: no type coercion
    # (false is not a temperature), so a request fits the schema exactly or is refused.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data: Any) -> Any:
        return _integral_floats_as_ints(data)


def _integral_floats_as_ints(value: Any) -> Any:
    """JSON does not tell 1.0 from 1 (JSON Schema's "integer" takes both); strict pydantic does."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral_floats_as_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral_floats_as_ints(v) for v in value]
    return value


# Bounded field types: the bounds appear in /openapi.json and a value past one is a 400 naming the field.
GroupSize = Annotated[int, Field(ge=1, le=MAX_N)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
Seed = Annotated[int, Field(ge=MIN_SEED, le=MAX_SEED)]
StopString = Annotated[str, Field(max_length=MAX_STOP_STRING_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None
TokenIds = list[int]


class APIError(Exception):
    """An error answered with OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        param: str | None = None,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.type = type
        self.code = code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code=None) -> dict:  # noqa: A002
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM: usage on every chunk


class SamplingExtras(OpenAIBaseModel):
    """Fields vLLM accepts in the body beyond OpenAI's (same names and defaults)."""

    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    priority: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # Seconds from arrival after which the request is aborted (the server's --request-timeout caps it).
    request_timeout: Annotated[float, Field(gt=0, le=MAX_REQUEST_TIMEOUT_S)] | None = None


class CompletionRequest(SamplingExtras):
    model: str | None = None
    prompt: (
        str
        | Annotated[list[str], Field(max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS)]
    )
    suffix: str | None = None
    max_tokens: int | None = 16
    temperature: float | None = None
    top_p: float | None = None
    n: GroupSize = 1
    best_of: GroupSize | None = None
    stop: Stop = None
    seed: Seed | None = None
    logprobs: TopLogprobs | None = None
    echo: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class TextContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingExtras):
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: GroupSize = 1
    best_of: GroupSize | None = None
    stop: Stop = None
    seed: Seed | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    add_generation_prompt: bool = True
    chat_template: str | None = None


class TokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]


# -- responses (documentation: the handlers build plain dicts in these shapes) ---------------------


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(ResponseModel):
    error: ErrorInfo


class Usage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    stop_reason: int | str | None = None


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatResponseMessage(ResponseModel):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(ResponseModel):
    index: int
    message: ChatResponseMessage
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    stop_reason: int | str | None = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int


class ModelList(ResponseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(ResponseModel):
    prompt: str
