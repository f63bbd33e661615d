"""ShareGPT-like and Alpaca-like request traces: lengths, real prompt tokens, arrival times.

No data set can be downloaded here, so the paper's two workloads are rebuilt from their
published statistics (vLLM paper, Fig. 11: ShareGPT mean 161.31 prompt / 337.99 output tokens,
long-tailed; Alpaca 19.31 / 58.45). Each length is lognormal (a long right tail, like both
data sets' histograms) and a (prompt, output) pair is redrawn until it passes the filter of
vLLM's benchmark scripts: both lengths >= 4, prompt <= 1024, prompt + output <= 2048. The
``mu`` of each lognormal was fitted (Monte Carlo, 400k pairs) so that the means *after* the
filter hit the targets; the ``sigma`` values set the tail and were chosen by hand, since the
data sets' percentiles are not published in the paper. docs/benchmarks.md lists the
resulting means and percentiles.

Prompt tokens are cut from a stream of real tokens (``quire.bench.workload``'s English corpus
run through the model's tokenizer) at a random offset, so no two prompts are one repeated
token and prefix caching finds nothing to share beyond chance. Everything is drawn from one
local ``random.Random(seed)``: the same arguments give the same trace.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from quire.bench.workload import CORPUS, Tokenizer, corpus_token_stream

__all__ = [
    "DATASETS",
    "LengthModel",
    "TraceRequest",
    "corpus_tokens",
    "make_trace",
    "sample_lengths",
    "word_token_stream",
]


@dataclass(frozen=True)
class LengthModel:
    """Lognormal prompt and output lengths, redrawn until they pass vLLM's benchmark filter."""

    name: str
    prompt_mu: float
    prompt_sigma: float
    output_mu: float
    output_sigma: float
    target_prompt_mean: float  # the published mean the fit aims at
    target_output_mean: float
    min_len: int = 4
    max_prompt_len: int = 1024
    max_total_len: int = 2048

    def draw(self, rng: random.Random) -> tuple[int, int]:
        while True:
            prompt = round(rng.lognormvariate(self.prompt_mu, self.prompt_sigma))
            output = round(rng.lognormvariate(self.output_mu, self.output_sigma))
            if (
                prompt >= self.min_len
                and output >= self.min_len
                and prompt <= self.max_prompt_len
                and prompt + output <= self.max_total_len
            ):
                return prompt, output


DATASETS: dict[str, LengthModel] = {
    "sharegpt": LengthModel("sharegpt", 4.6862, 1.0, 5.4979, 0.9, 161.31, 337.99),
    "alpaca": LengthModel("alpaca", 2.7752, 0.6, 3.7487, 0.8, 19.31, 58.45),
}


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace: its prompt tokens, its true output length and when it arrives (s)."""

    prompt_token_ids: tuple[int, ...]
    output_len: int
    arrival_time: float

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def total_len(self) -> int:
        return self.prompt_len + self.output_len


def _model(dataset: str) -> LengthModel:
    key = dataset.removesuffix("-like")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}.")
    return DATASETS[key]


def sample_lengths(dataset: str, num: int, seed: int = 0) -> list[tuple[int, int]]:
    """``num`` (prompt_len, output_len) pairs of ``dataset`` ("sharegpt" or "alpaca")."""
    model = _model(dataset)
    rng = random.Random(seed)
    return [model.draw(rng) for _ in range(num)]


def corpus_tokens(tokenizer: Tokenizer) -> list[int]:
    """The real-token stream prompts are cut from (the workload corpus, tokenized)."""
    return corpus_token_stream(tokenizer)


def word_token_stream(text: str = CORPUS) -> list[int]:
    """A tokenizer-free stand-in: the corpus's words numbered by first appearance.

    For ``--simulate`` runs, where no model reads the ids and loading a GGUF tokenizer would
    cost more time than the whole simulation; real runs always use the model's tokenizer.
    """
    ids: dict[str, int] = {}
    return [ids.setdefault(word, len(ids)) for word in text.split()]


def make_trace(
    dataset: str,
    num_requests: int,
    tokens: Sequence[int],
    request_rate: float = math.inf,
    seed: int = 0,
    max_total_len: int | None = None,
) -> list[TraceRequest]:
    """A seeded trace: lengths from ``dataset``, prompts cut from ``tokens``, Poisson arrivals.

    ``request_rate`` is requests per second (exponential gaps); ``inf`` puts every arrival at
    0 (an offline batch). ``max_total_len`` (e.g. a small model's context) shortens outputs,
    then prompts, of the rare requests that would not fit.
    """
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if not tokens:
        raise ValueError("tokens must not be empty")
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0, got {request_rate}")
    model = _model(dataset)
    rng = random.Random(seed)
    now = 0.0
    trace = []
    for _ in range(num_requests):
        prompt_len, output_len = model.draw(rng)
        if max_total_len is not None:
            prompt_len = min(prompt_len, max_total_len // 2)
            output_len = min(output_len, max_total_len - prompt_len)
        start = rng.randrange(len(tokens))
        prompt = tuple(tokens[(start + i) % len(tokens)] for i in range(prompt_len))
        if not math.isinf(request_rate):
            now += rng.expovariate(request_rate)
        trace.append(TraceRequest(prompt, output_len, now))
    return trace
