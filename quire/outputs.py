"""What the engine hands back to callers: vLLM's output shapes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One candidate token at one position: its log-probability, 1-based rank and text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One position's candidates, keyed by token id.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One generated sequence of a request."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    score: float | None = None  # beam search only: the length-penalised score it is ranked by

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's state after an engine step: its prompt and every output so far."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict[str, float] = field(default_factory=dict)
    # Set when processing this request failed (the engine and other requests went on): the
    # request is finished, its outputs end with finish_reason "abort", and this says why.
    error: str | None = None


@dataclass
class BeamSearchSequence:
    """One returned beam (vLLM's shape): ``tokens`` and ``text`` cover the prompt and the beam."""

    tokens: list[int]
    text: str
    cum_logprob: float
    score: float | None  # the length-penalised score the beams are ranked by
    num_prompt_tokens: int
    output_text: str = ""
    finish_reason: str | None = None

    @property
    def output_tokens(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens :]


@dataclass
class BeamSearchOutput:
    """A prompt's beams, best first."""

    sequences: list[BeamSearchSequence]
