"""The HTTP server's own flags (``quire serve`` adds the engine's to them).

Kept apart from ``api_server`` so that building the ``quire serve`` parser, e.g. for ``--help``,
does not import FastAPI or uvicorn.
"""

from __future__ import annotations

import argparse

# What clients call the embedded default model when neither MODEL nor --served-model-name is given.
DEFAULT_SERVED_MODEL_NAME = "SmolLM2-135M-Instruct"


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
        "--uvicorn-log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="(default: %(default)s)",
    )
