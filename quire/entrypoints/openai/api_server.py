"""The FastAPI app: OpenAI's endpoints over an ``AsyncLLMEngine``, plus /health, /metrics, /tokenize.

``build_app(engine, ...)`` makes the app (tests build it around an engine they own);
``run_server(args)`` is what ``quire serve`` runs (``quire.entrypoints.serve`` parses its
flags): load the engine, build the app, run uvicorn.
The app starts the engine's step thread on start-up and stops it (aborting what is left) on
shut-down, unless ``manage_engine=False``.
"""

from __future__ import annotations

import logging
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from quire.config import EngineArgs
from quire.engine.async_engine import AsyncLLMEngine, EngineDeadError
from quire.engine.llm_engine import LLMEngine
from quire.entrypoints.engine_args import engine_kwargs
from quire.entrypoints.openai.cli_args import DEFAULT_SERVED_MODEL_NAME
from quire.entrypoints.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
)
from quire.entrypoints.openai.serving_chat import OpenAIServingChat, apply_chat_template
from quire.entrypoints.openai.serving_completion import OpenAIServingCompletion
from quire.metrics import CONTENT_TYPE, EngineMetrics

logger = logging.getLogger(__name__)

# Reachable without the API key (probes and scrapers).
OPEN_PATHS = frozenset({"/health", "/metrics", "/ping", "/version"})
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
    return JSONResponse(error_body(message, "invalid_request_error", param, None), status_code=400)


def build_app(
    engine: AsyncLLMEngine,
    served_model_names: list[str] | None = None,
    api_key: str | None = None,
    model_path: str | None = None,
    manage_engine: bool = True,
) -> FastAPI:
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
    completions = OpenAIServingCompletion(engine, names, priority_enabled)
    chat = OpenAIServingChat(engine, names, priority_enabled)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind, None, None), status_code=exc.status_code)

    @app.exception_handler(EngineDeadError)
    async def _dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "server_error", None, None), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        await engine.check_health()
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        if engine.metrics is None:
            raise APIError("metrics are disabled.", status_code=404)
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
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

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
        return await completions.create_completion(request, raw_request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
        return await chat.create_chat_completion(request, raw_request)

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> dict[str, Any]:
        completions.model_name(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise APIError("give exactly one of prompt and messages.", param="prompt")
        if request.messages is not None:
            token_ids = apply_chat_template(engine.tokenizer, request.messages, request.add_generation_prompt).token_ids
        else:
            token_ids = engine.tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
        return {"count": len(token_ids), "max_model_len": engine.max_model_len, "tokens": list(token_ids)}

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> dict[str, Any]:
        completions.model_name(request.model)
        vocab = engine.vocab_size
        if not all(0 <= t < vocab for t in request.tokens):
            raise APIError(f"tokens must be integers in [0, {vocab}).", param="tokens")
        return {"prompt": engine.tokenizer.decode(request.tokens)}

    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    return app


def run_server(args) -> int:
    """Build the engine from ``quire serve``'s parsed flags and serve until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    names = args.served_model_name or [args.model or DEFAULT_SERVED_MODEL_NAME]
    llm_engine = LLMEngine(EngineArgs(**engine_kwargs(args)))
    metrics = EngineMetrics(names[0])
    # No --log-stats-interval: the engine's default interval.
    interval = {} if args.log_stats_interval is None else {"log_stats_interval": args.log_stats_interval}
    engine = AsyncLLMEngine(llm_engine, metrics=metrics, **interval)
    app = build_app(
        engine,
        served_model_names=names,
        api_key=args.api_key,
        model_path=llm_engine.config.model.model,
    )
    logger.info("serving %s on http://%s:%d (max_model_len %d)", names[0], args.host, args.port, engine.max_model_len)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level, timeout_keep_alive=5)
    return 0
