"""``quire serve [MODEL]``: the OpenAI-compatible HTTP server.

Parsing imports only the flag definitions; the server (FastAPI, uvicorn, the engine) is imported
when the command runs, so ``quire serve --help`` is quick and nothing of ``quire bench`` (rich,
matplotlib) is ever loaded by the server.
"""

from __future__ import annotations

import argparse
import sys

from quire.entrypoints.engine_args import add_engine_args
from quire.entrypoints.openai.cli_args import add_server_args

# The step thread releases the GIL around every torch op and must get it back at once; with the
# default 5 ms switch interval the event loop (SSE, JSON) keeps it that long each time. Measured
# with `quire bench serve` at 4 req/s: mean TPOT 127 -> 98 ms, mean TTFT 286 -> 166 ms.
SERVE_GIL_SWITCH_INTERVAL_S = 0.0002


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Positional, like `vllm serve MODEL`; --model stays as well, since it is an engine flag.
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="model path (default: embedded)")
    add_server_args(parser)
    add_engine_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            print(f"error: two models given: {args.model_tag!r} and --model {args.model!r}", file=sys.stderr)
            return 2
        args.model = args.model_tag

    from quire.entrypoints.openai.api_server import run_server

    sys.setswitchinterval(SERVE_GIL_SWITCH_INTERVAL_S)  # process-wide, so set by the command only
    try:
        return run_server(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
