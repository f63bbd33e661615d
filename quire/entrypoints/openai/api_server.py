"""The FastAPI app: OpenAI's endpoints over an ``AsyncLLMEngine``, plus /health, /metrics, /tokenize.

``build_app(engine, ...)`` makes the app (tests build it around an engine they own);
``run_server(args)`` is what ``quire serve`` runs (``quire.entrypoints.serve`` parses its
flags): load the engine, build the app, run uvicorn.
The app starts the engine's step thread on start-up and stops it (aborting what is left) on
shut-down, unless ``manage_engine=False``.

Every error is answered in OpenAI's body (``{"error": {...}}``): 400 for a bad request (naming the
field), 413 for a body over ``--max-request-bytes``, 503 with ``Retry-After`` when admission control
refuses a request (queue full, or draining for shutdown), 408 when a request runs past its
timeout, 500 for anything else. ``/openapi.json`` documents these and every request and response field.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from quire.config import EngineArgs
from quire.engine.admission import AdmissionControl, RequestRejected
from quire.engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestFailedError, RequestTimeoutError
from quire.engine.llm_engine import LLMEngine
from quire.entrypoints.engine_args import engine_kwargs
from quire.entrypoints.openai.cli_args import DEFAULT_SERVED_MODEL_NAME
from quire.entrypoints.openai.limits import DEFAULT_MAX_REQUEST_BYTES
from quire.entrypoints.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    error_body,
)
from quire.entrypoints.openai.serving_chat import OpenAIServingChat, apply_chat_template
from quire.entrypoints.openai.serving_completion import OpenAIServingCompletion
from quire.entrypoints.openai.shutdown import DrainingServer
from quire.metrics import CONTENT_TYPE, EngineMetrics
from quire.sampling_params import is_valid_unicode

logger = logging.getLogger(__name__)

# Reachable without the API key (probes and scrapers).
OPEN_PATHS = frozenset({"/health", "/metrics", "/ping", "/version"})
# The endpoints that add requests to the engine (admission control guards them).
GENERATE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
# pydantic's tags for union members in an error location: not field names.
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


class APIKeyMiddleware:
    """Plain ASGI (so streaming and disconnect detection pass straight through)."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                message = "Incorrect API key provided." if given else "Missing API key (Authorization: Bearer KEY)."
                body = error_body(message, "invalid_request_error", None, "invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ErrorJSONResponse(JSONResponse):
    """An error body as ASCII JSON: a message may quote the client's input, lone surrogates included."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(body: dict, status_code: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return ErrorJSONResponse(body, status_code=status_code, headers=headers)


class BodySizeLimit:
    """Plain ASGI: a request body over ``max_bytes`` is refused with 413 before it is read whole.

    A declared ``content-length`` over the limit is answered at once; a chunked body is counted as
    it arrives and refused once past the limit (FastAPI re-raises the ``HTTPException`` raised
    while it reads the body, and the app answers it in OpenAI's format).
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"The request body is larger than this server's limit of {self.max_bytes} bytes."

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            body = error_body(self._message(), "invalid_request_error", None, "request_too_large")
            await error_response(body, 413)(scope, receive, send)
            return
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, counting_receive, send)


class AdmissionGate:
    """Plain ASGI: while admission control refuses new requests, a generation request is answered 503
    before its body is read or parsed, so a refusal under a burst costs the server almost nothing.

    Only a cheap pre-check (draining, or the queue full); the full check, with the prompt's tokens,
    runs when the request is added to the engine.
    """

    def __init__(self, app, engine: AsyncLLMEngine) -> None:
        self.app = app
        self.engine = engine

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in GENERATE_PATHS:
            try:
                self.engine.check_admission()
            except RequestRejected as exc:
                await rejection_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def rejection_response(exc: RequestRejected) -> JSONResponse:
    code = "server_shutting_down" if exc.reason == "draining" else "server_overloaded"
    body = error_body(str(exc), "server_error", None, code)
    return error_response(body, 503, headers={"Retry-After": str(exc.retry_after)})


def _param(loc: tuple) -> str | None:
    parts: list[str] = []
    for item in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and item.isidentifier() and item not in _UNION_TAGS:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or None


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    param = _param(tuple(first.get("loc", ())))
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif first.get("type") == "json_invalid":
        param = None
        message = f"The request body is not valid JSON: {first.get('msg')}"
    else:
        message = f"{param or 'body'}: {first.get('msg')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more errors)"
    return error_response(error_body(message, "invalid_request_error", param, None), 400)


# What each endpoint may answer besides 200, for /openapi.json.
_ERRORS = {
    400: {"model": ErrorResponse, "description": "Invalid request (the error's param names the field)"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key (with --api-key)"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    413: {"model": ErrorResponse, "description": "Request body over --max-request-bytes"},
    500: {"model": ErrorResponse, "description": "Server error"},
}
_GENERATE_ERRORS = {
    **_ERRORS,
    408: {"model": ErrorResponse, "description": "The request ran past its timeout and was aborted"},
    503: {"model": ErrorResponse, "description": "Overloaded or shutting down; retry after Retry-After seconds",
          "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}},
}
# With stream: true, server-sent events: each data is a JSON chunk (choices with a text or delta), an
# in-band error ({"error": {...}}) if the request fails after it started, and finally "[DONE]".
_SSE = {
    "text/event-stream": {
        "schema": {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]},
    }
}


def _bound_token_ids(node, vocab_size: int) -> None:
    """Give every integer in a token-id field's schema the vocabulary's range."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node.update(minimum=0, maximum=vocab_size - 1)
        for child in node.values():
            _bound_token_ids(child, vocab_size)
    elif isinstance(node, list):
        for child in node:
            _bound_token_ids(child, vocab_size)


def _openapi(app: FastAPI, served_model_names: list[str], vocab_size: int) -> dict:
    """FastAPI's schema, made exact: no 422 responses (validation errors are answered 400 in OpenAI's
    format), ``model`` is one of the served names (any other is a 404) and token ids are in the
    model's vocabulary (others are a 400)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        for component in components.values():
            model = component.get("properties", {}).get("model")
            if model is not None and "anyOf" in model:  # a request's optional model name
                model["anyOf"] = [{"type": "string", "enum": list(served_model_names)}, {"type": "null"}]
        for component, field in (("CompletionRequest", "prompt"), ("DetokenizeRequest", "tokens")):
            _bound_token_ids(components.get(component, {}).get("properties", {}).get(field), vocab_size)
        app.openapi_schema = schema
    return app.openapi_schema


def build_app(
    engine: AsyncLLMEngine,
    served_model_names: list[str] | None = None,
    api_key: str | None = None,
    model_path: str | None = None,
    manage_engine: bool = True,
    request_timeout: float | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    trust_request_chat_template: bool = False,
) -> FastAPI:
    """The app. ``request_timeout``: seconds after which any request is aborted (a request's own
    ``request_timeout`` field may only lower it); ``max_request_bytes`` bounds a request body;
    ``trust_request_chat_template`` lets chat requests bring their own template."""
    names = list(served_model_names or ["quire"])
    priority_enabled = engine.engine.scheduler.config.policy == "priority"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_engine:
            await engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await engine.shutdown()

    app = FastAPI(title="Quire", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.openapi = lambda: _openapi(app, names, engine.vocab_size)
    completions = OpenAIServingCompletion(engine, names, priority_enabled, request_timeout)
    chat = OpenAIServingChat(
        engine, names, priority_enabled, request_timeout, trust_request_chat_template=trust_request_chat_template
    )
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.body(), exc.status_code)

    @app.exception_handler(RequestRejected)
    async def _rejected(request: Request, exc: RequestRejected) -> JSONResponse:
        return rejection_response(exc)

    @app.exception_handler(RequestTimeoutError)
    async def _timed_out(request: Request, exc: RequestTimeoutError) -> JSONResponse:
        return error_response(error_body(str(exc), "timeout_error", None, "request_timeout"), 408)

    @app.exception_handler(RequestFailedError)
    async def _failed(request: Request, exc: RequestFailedError) -> JSONResponse:
        return error_response(error_body(str(exc), "server_error", None, None), 500)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error answering %s", request.url.path)
        return error_response(error_body(f"Internal server error: {type(exc).__name__}", "server_error"), 500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = "request_too_large" if exc.status_code == 413 else None
        return error_response(error_body(str(exc.detail), kind, None, code), exc.status_code)

    @app.exception_handler(EngineDeadError)
    async def _dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(error_body(str(exc), "server_error", None, None), 500)

    @app.get(
        "/health",
        response_class=Response,
        responses={200: {"description": "Serving (empty body)"}, 500: _ERRORS[500], 503: _GENERATE_ERRORS[503]},
    )
    async def health() -> Response:
        await engine.check_health()
        if engine.draining:
            raise RequestRejected("The server is shutting down.", "draining")
        return Response(status_code=200)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
            404: _ERRORS[404],
        },
    )
    async def metrics() -> Response:
        if engine.metrics is None:
            raise APIError("metrics are disabled.", status_code=404)
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList, responses={401: _ERRORS[401]})
    async def models() -> dict[str, Any]:
        data = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "quire",
                "root": model_path or name,
                "parent": None,
                "max_model_len": engine.max_model_len,
            }
            for name in names
        ]
        return {"object": "list", "data": data}

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses={200: {"content": _SSE}, **_GENERATE_ERRORS},
    )
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
        return await completions.create_completion(request, raw_request)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses={200: {"content": _SSE}, **_GENERATE_ERRORS},
    )
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
        return await chat.create_chat_completion(request, raw_request)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
    async def tokenize(request: TokenizeRequest) -> dict[str, Any]:
        completions.model_name(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise APIError("give exactly one of prompt and messages.", param="prompt")
        if request.messages is not None:
            token_ids = apply_chat_template(engine.tokenizer, request.messages, request.add_generation_prompt).token_ids
        elif not is_valid_unicode(request.prompt):
            raise APIError("prompt must be valid Unicode text (it has a lone surrogate).", param="prompt")
        else:
            token_ids = engine.tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
        return {"count": len(token_ids), "max_model_len": engine.max_model_len, "tokens": list(token_ids)}

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
    async def detokenize(request: DetokenizeRequest) -> dict[str, Any]:
        completions.model_name(request.model)
        vocab = engine.vocab_size
        if not all(0 <= t < vocab for t in request.tokens):
            raise APIError(f"tokens must be integers in [0, {vocab}).", param="tokens")
        return {"prompt": engine.tokenizer.decode(request.tokens)}

    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    app.add_middleware(AdmissionGate, engine=engine)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)  # outermost: no key, nothing read
    return app


def run_server(args) -> int:
    """Build the engine from ``quire serve``'s parsed flags and serve until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    names = args.served_model_name or [args.model or DEFAULT_SERVED_MODEL_NAME]
    llm_engine = LLMEngine(EngineArgs(**engine_kwargs(args)))
    metrics = EngineMetrics(names[0])
    # No --log-stats-interval: the engine's default interval.
    interval = {} if args.log_stats_interval is None else {"log_stats_interval": args.log_stats_interval}
    admission = AdmissionControl(args.max_waiting_requests, args.max_waiting_tokens)
    engine = AsyncLLMEngine(llm_engine, metrics=metrics, admission=admission, **interval)
    app = build_app(
        engine,
        served_model_names=names,
        api_key=args.api_key,
        model_path=llm_engine.config.model.model,
        request_timeout=args.request_timeout,
        max_request_bytes=args.max_request_bytes,
        trust_request_chat_template=args.trust_request_chat_template,
    )
    logger.info("serving %s on http://%s:%d (max_model_len %d)", names[0], args.host, args.port, engine.max_model_len)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.uvicorn_log_level, timeout_keep_alive=5
    )
    DrainingServer(config, engine, args.shutdown_timeout).run()
    logger.info("shut down")
    return 0
