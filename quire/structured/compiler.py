"""``StructuredOutputsParams`` → a compiled xgrammar grammar for the model's vocabulary.

xgrammar was chosen by measurement (docs/benchmarks.md, "Grammar engines"): the cheapest per-token
mask of the engines tried, fast schema compiles, and JSON schema, regex and EBNF in one library.
The tokenizer's vocabulary is read once, on the first constrained request, so engines that never
see one pay nothing. Compiled grammars are cached by the library, keyed by the constraint.
"""

from __future__ import annotations

import json
import re

import xgrammar as xgr

from quire.sampling_params import StructuredOutputsParams

_CACHE_LIMIT_BYTES = 64 << 20


class StructuredOutputCompiler:
    """Compiles constraints for one tokenizer; a constraint that does not compile is a ``ValueError``."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int | None) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_token_id = eos_token_id
        self._compiler: xgr.GrammarCompiler | None = None

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        kind = params.kind
        compiler = self._grammar_compiler()
        try:
            if kind == "json":
                return compiler.compile_json_schema(params.json_schema, any_whitespace=False)
            if kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(params.regex)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(params.choice))
            return compiler.compile_grammar(params.grammar)
        except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError and its own types
            raise ValueError(f"structured_outputs.{kind} could not be compiled: {_reason(exc)}") from exc

    def _grammar_compiler(self) -> xgr.GrammarCompiler:
        if self._compiler is None:
            stops = [self._eos_token_id] if self._eos_token_id is not None else None
            info = xgr.TokenizerInfo.from_huggingface(
                self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=stops
            )
            # One thread: the engine's step owns the cores; compiles are milliseconds. The cache of
            # compiled grammars is bounded, so a server fed ever-new schemas does not grow without end.
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=_CACHE_LIMIT_BYTES)
        return self._compiler


def _reason(exc: Exception) -> str:
    """xgrammar's message without its C++ source location prefix (``[12:00:00] /path/file.cc:42: ``)."""
    lines = str(exc).strip().splitlines()
    return _SOURCE_PREFIX.sub("", lines[0]) if lines else type(exc).__name__


_SOURCE_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly ``choices`` (each a JSON-escaped literal)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
