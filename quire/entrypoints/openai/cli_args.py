"""The HTTP server's own flags (``quire serve`` adds the engine's to them).

Kept apart from ``api_server`` so that building the ``quire serve`` parser, e.g. for ``--help``,
does not import FastAPI or uvicorn.
"""

from __future__ import annotations

import argparse

from quire.entrypoints.openai.limits import DEFAULT_MAX_REQUEST_BYTES

# What clients call the embedded default model when neither MODEL nor --served-model-name is given.
DEFAULT_SERVED_MODEL_NAME = "SmolLM2-135M-Instruct"
# Seconds a SIGTERM / SIGINT leaves requests in flight to finish before they are aborted.
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def add_server_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server arguments")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    group.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    group.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the API")
    group.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help=f"name(s) clients use in 'model'; the first labels the metrics (default: MODEL, or "
        f"{DEFAULT_SERVED_MODEL_NAME} for the embedded model)",
    )
    # None leaves the interval to AsyncLLMEngine, which owns its default.
    group.add_argument(
        "--log-stats-interval",
        type=float,
        default=None,
        help="seconds between stats log lines while busy; 0 turns them off (default: the engine's)",
    )
    group.add_argument(
        "--max-waiting-requests",
        type=_positive_int,
        default=None,
        help="requests waiting for their first token beyond which new ones get 503 + Retry-After (default: no bound)",
    )
    group.add_argument(
        "--max-waiting-tokens",
        type=_positive_int,
        default=None,
        help="prompt tokens waiting for a first token beyond which new requests get 503 (default: no bound)",
    )
    group.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=None,
        help="seconds after which a request is aborted (its request_timeout field may lower it; default: none)",
    )
    group.add_argument(
        "--shutdown-timeout",
        type=_seconds,
        default=DEFAULT_SHUTDOWN_TIMEOUT_S,
        help="on SIGTERM/SIGINT, seconds for requests in flight to finish before they are aborted "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--max-request-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="largest request body; larger ones get 413 (default: %(default)s)",
    )
    group.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="accept a chat_template in chat requests (a template is code the server runs; off by default)",
    )
    group.add_argument(
        "--uvicorn-log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="(default: %(default)s)",
    )
