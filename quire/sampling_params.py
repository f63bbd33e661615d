"""Per-request sampling settings, with vLLM's names, defaults and meaning."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

# OpenAI's range for logit_bias values.
MAX_LOGIT_BIAS = 100.0


@dataclass
class StructuredOutputsParams:
    """A constraint on the generated text (vLLM's names): set exactly one of the fields.

    ``json``: a JSON schema (dict or JSON text); ``json_object``: any JSON object; ``regex``: the
    whole output matches it; ``choice``: the output is one of these strings; ``grammar``: an EBNF
    grammar (GBNF style, ``root ::= ...``). Compiling happens when the request is added, where a bad
    schema, regex or grammar is a ``ValueError`` naming the field.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        chosen = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(chosen) != 1:
            raise ValueError(
                "structured_outputs must set exactly one of json, regex, choice, grammar, json_object; "
                f"got {chosen or 'none'}."
            )
        if isinstance(self.json, str):
            try:
                json.loads(self.json)
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from exc
        elif self.json is not None and not isinstance(self.json, dict):
            raise ValueError(f"structured_outputs.json must be a schema (dict or JSON text), got {self.json!r}.")
        if self.choice is not None and not (
            isinstance(self.choice, list | tuple) and self.choice and all(isinstance(c, str) for c in self.choice)
        ):
            raise ValueError(f"structured_outputs.choice must be a non-empty list of strings, got {self.choice!r}.")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}.")

    @property
    def kind(self) -> str:
        """Which constraint is set: the field's name."""
        return next(f.name for f in fields(self) if getattr(self, f.name) not in (None, False))

    @property
    def json_schema(self) -> str | None:
        """The ``json`` schema as JSON text."""
        if self.json is None:
            return None
        return self.json if isinstance(self.json, str) else json.dumps(self.json)



@dataclass
class SamplingParams:
    """How to turn a request's logits into tokens, and when to stop.

    Every field keeps vLLM's meaning. Validation happens at construction time and
    raises ``ValueError`` naming the offending field, so a bad request never reaches
    the engine.
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop_strings = []
        elif isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        elif isinstance(self.stop, list | tuple):
            self.stop_strings = list(self.stop)
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}.")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, list | tuple):
            self.stop_token_ids = list(self.stop_token_ids)
        else:
            raise ValueError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}.")
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ValueError(f"{name} {message}, got {getattr(self, name)!r}.")

        check(_is_int(self.n) and self.n >= 1, "n", "must be an integer >= 1")
        if self.best_of is not None:
            check(_is_int(self.best_of) and self.best_of >= self.n, "best_of", "must be an integer >= n")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        check(self.repetition_penalty > 0.0, "repetition_penalty", "must be > 0")
        check(self.temperature >= 0.0, "temperature", "must be >= 0")
        check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        check(_is_int(self.top_k) and self.top_k >= 0, "top_k", "must be -1 (off), 0 (off) or a positive integer")
        check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        if self.seed is not None:
            check(_is_int(self.seed), "seed", "must be an integer")
        check(all(isinstance(s, str) and s for s in self.stop_strings), "stop", "must contain non-empty strings")
        check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be token ids >= 0")
        if self.max_tokens is not None:
            check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1")
        check(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens}, max_tokens={self.max_tokens}."
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                check(_is_int(value) and value >= 0, name, "must be an integer >= 0")

        self._validate_token_controls()

    def _validate_token_controls(self) -> None:
        """``logit_bias``, ``allowed_token_ids``, ``bad_words``, ``structured_outputs`` (vocabulary ranges
        are checked where the vocabulary is known: the engine's input processor)."""
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must map token ids to biases, got {self.logit_bias!r}.")
            bias: dict[int, float] = {}
            for token, value in self.logit_bias.items():
                token_id = _token_id(token)
                if token_id is None:
                    raise ValueError(f"logit_bias keys must be token ids >= 0, got {token!r}.")
                if not (isinstance(value, int | float) and not isinstance(value, bool)) or not (
                    -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS
                ):
                    raise ValueError(f"logit_bias values must be in [-100, 100], got {value!r} for token {token}.")
                bias[token_id] = float(value)
            self.logit_bias = bias
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not (isinstance(ids, list | tuple) and ids and all(_is_int(t) and t >= 0 for t in ids)):
                raise ValueError(f"allowed_token_ids must be a non-empty list of token ids >= 0, got {ids!r}.")
            self.allowed_token_ids = list(ids)
        if self.bad_words is not None:
            words = self.bad_words
            if not (isinstance(words, list | tuple) and all(isinstance(w, str) and w.strip() for w in words)):
                raise ValueError(f"bad_words must be a list of non-empty strings, got {words!r}.")
            self.bad_words = list(words)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(
                f"structured_outputs must be a StructuredOutputsParams, got {type(self.structured_outputs).__name__}."
            )

    @property
    def num_seqs(self) -> int:
        """Sequences generated for the request: ``best_of`` (default ``n``); the ``n`` best are returned."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


_GREEDY_EPS = 1e-5


@dataclass
class BeamSearchParams:
    """Beam search settings, with vLLM's names (``LLM.beam_search(prompts, params)``).

    ``temperature`` is accepted for vLLM compatibility and, as in vLLM, does not change the
    candidate scores: beams are ranked by the model's raw log-probabilities. The ranking and
    stopping rules are transformers' (see ``quire.sampling.beam_search``).
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None  # every beam follows the constraint

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ValueError(f"{name} {message}, got {getattr(self, name)!r}.")

        check(_is_int(self.beam_width) and self.beam_width >= 1, "beam_width", "must be an integer >= 1")
        check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1")
        check(self.temperature >= 0.0, "temperature", "must be >= 0")
        check(isinstance(self.length_penalty, int | float), "length_penalty", "must be a number")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(
                f"structured_outputs must be a StructuredOutputsParams, got {type(self.structured_outputs).__name__}."
            )


def _token_id(value: Any) -> int | None:
    """A token id given as an int or as decimal text (JSON object keys are strings)."""
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value if _is_int(value) and value >= 0 else None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
