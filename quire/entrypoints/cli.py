"""The ``quire`` command: builds the parser and dispatches to the subcommand's module.

Each subcommand lives in its own module, which adds its arguments and sets ``func``. Only the
module of the subcommand being run is imported, so ``quire serve`` never loads ``quire bench``
(and its rich and matplotlib), and no subcommand module imports another or this one.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, its function that fills in the subcommand's parser, help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("quire.entrypoints.serve", "add_arguments", "run the OpenAI-compatible HTTP server"),
    "generate": ("quire.entrypoints.generate", "add_arguments", "complete one prompt and print the text"),
    "env": (
        "quire.entrypoints.env",
        "add_arguments",
        "print the CPU, its ISA levels and the kernel paths chosen for it",
    ),
    "bench": (
        "quire.bench.cli",
        "add_bench_commands",
        "benchmarks reproducing the paper's comparisons (tables, JSON, PNGs)",
    ),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for ``argv``: every subcommand is listed, but only the one named in ``argv`` is filled in."""
    parser = argparse.ArgumentParser(prog="quire", description="Quire: PagedAttention LLM inference engine")
    commands = parser.add_subparsers(dest="command", required=True)
    # `quire` itself takes no option with a value, so the first word that is not an option is the command.
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    for name, (module, add_arguments, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            getattr(importlib.import_module(module), add_arguments)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
