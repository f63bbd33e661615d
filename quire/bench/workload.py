"""A seeded, reproducible request mix for Quire's benchmarks.

The offline throughput benchmark (``quire.bench.throughput``) and, later, a server
benchmark must time *the same* requests, otherwise their numbers cannot be compared. So
the mix lives here, apart from any engine: it needs only a tokenizer and a seed.

Prompts are real English, not random token ids: random ids make a model attend to noise
and produce degenerate outputs, and they are not what an engine sees in practice. The text
is a built-in corpus of a few hundred tokens; every prompt starts at a token chosen by the
seeded RNG and wraps around the end of the corpus, so prompts read naturally and rarely
share a prefix (prefix caching, were it enabled, would gain little). Output lengths are
fixed per request and the requests are meant to be run greedily with EOS ignored, so every
engine produces exactly the same number of tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "BenchRequest",
    "CORPUS",
    "Tokenizer",
    "WorkloadSummary",
    "corpus_token_stream",
    "make_workload",
    "single_stream_prompt",
    "summarize",
]

DEFAULT_NUM_REQUESTS = 64
DEFAULT_PROMPT_LEN_RANGE = (16, 256)
DEFAULT_OUTPUT_LEN_RANGE = (32, 256)

# Plain prose on unrelated topics, so prompts cut from different places do not look alike.
CORPUS = """\
The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of \
oil and a rag. For forty years he had trimmed the wick, polished the great lens and \
watched the beam sweep across the water. Ships no longer needed him, since satellites \
told every captain where the rocks lay, but he kept the light burning anyway. He said \
that a coast without a lighthouse felt like a house without a window.
Bread is one of the oldest prepared foods. Flour, water, salt and yeast are mixed into a \
dough, which is kneaded until the gluten forms long elastic strands. The dough then rests \
while the yeast ferments the sugars and releases carbon dioxide, and the trapped gas makes \
the loaf rise. A hot oven sets the crumb, browns the crust and fills the kitchen with a \
smell that few people can resist.
A computer's memory is organised as a hierarchy. Small and fast caches sit next to the \
processor, larger and slower main memory sits further away, and disks or network storage \
sit further still. Programs run quickly when the data they need is already close at hand, \
so good software arranges its work to reuse what is in the cache before it is evicted. \
Operating systems divide memory into fixed-size pages and keep a table that maps each \
virtual page to a physical frame.
In the spring the river rose quickly. Snow melted in the mountains, streams swelled in \
the valleys, and the water carried branches, mud and the occasional lost boot down to \
the town. The mayor ordered sandbags to be stacked along the old stone wall. Children \
watched from the bridge as the current tugged at the pillars, and the baker handed out \
warm rolls to the volunteers who worked through the night.
Learning to play the violin takes patience. The beginner must learn to hold the bow \
lightly, to keep it straight, and to draw it at an even speed so that the string sings \
instead of scratching. Scales come next, then simple tunes, then studies that train the \
fingers of the left hand to land exactly in tune. After a few years the instrument starts \
to feel less like an obstacle and more like a voice.
The committee met on Tuesday to review the budget for the coming year. Most of the \
discussion concerned the new library wing, which had run over its estimate because the \
foundations needed more work than expected. Several members argued for delaying the \
roof repairs on the town hall, while others warned that a leaking roof would only cost \
more later. In the end they agreed to ask the architect for a revised plan by the end \
of the month.
Migrating birds cover astonishing distances. The arctic tern flies from the far north to \
the edge of Antarctica and back every year, seeing more daylight than any other animal. \
Birds navigate using the position of the sun, the pattern of the stars, the earth's \
magnetic field and landmarks such as coastlines and mountain ranges. Young birds often \
make their first journey alone, guided only by instinct.
When you write a letter by hand, you slow down. Each sentence has to be formed before the \
pen touches the paper, because crossing out looks untidy and starting again takes time. \
Perhaps that is why old letters often read so clearly: their authors had already done \
the editing in their heads. A letter also carries the hand that wrote it, the pressure \
of the pen and the small habits of a person's script.
"""


class Tokenizer(Protocol):
    """The one tokenizer method the workload needs (any Hugging Face tokenizer has it)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class BenchRequest:
    """One request of the mix: these prompt tokens, then exactly ``output_len`` generated tokens."""

    prompt_token_ids: tuple[int, ...]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class WorkloadSummary:
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    min_prompt_len: int
    max_prompt_len: int
    min_output_len: int
    max_output_len: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


def corpus_token_stream(tokenizer: Tokenizer, text: str = CORPUS) -> list[int]:
    """The corpus as one stream of token ids (line breaks become spaces: it is read as prose)."""
    tokens = tokenizer.encode(" ".join(text.split()), add_special_tokens=False)
    if not tokens:
        raise ValueError("the corpus produced no tokens")
    return list(tokens)


def _cut(tokens: list[int], start: int, length: int) -> tuple[int, ...]:
    """``length`` tokens from ``start``, wrapping around the end of the stream."""
    return tuple(tokens[(start + i) % len(tokens)] for i in range(length))


def make_workload(
    tokenizer: Tokenizer,
    num_requests: int = DEFAULT_NUM_REQUESTS,
    seed: int = 0,
    prompt_len_range: tuple[int, int] = DEFAULT_PROMPT_LEN_RANGE,
    output_len_range: tuple[int, int] = DEFAULT_OUTPUT_LEN_RANGE,
) -> list[BenchRequest]:
    """The benchmark's request mix: lengths uniform in the (inclusive) ranges, fixed by ``seed``.

    The RNG is local, so the mix depends only on the arguments and the tokenizer, never on
    whatever else the process has drawn from ``random``.
    """
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    for name, (low, high) in (("prompt_len_range", prompt_len_range), ("output_len_range", output_len_range)):
        if not 1 <= low <= high:
            raise ValueError(f"{name} must satisfy 1 <= low <= high, got {(low, high)}")
    rng = random.Random(seed)
    tokens = corpus_token_stream(tokenizer)
    requests = []
    for _ in range(num_requests):
        prompt_len = rng.randint(*prompt_len_range)
        output_len = rng.randint(*output_len_range)
        start = rng.randrange(len(tokens))
        requests.append(BenchRequest(prompt_token_ids=_cut(tokens, start, prompt_len), output_len=output_len))
    return requests


def single_stream_prompt(tokenizer: Tokenizer, prompt_len: int = 32) -> tuple[int, ...]:
    """A fixed prompt for single-request latency: the corpus's first ``prompt_len`` tokens."""
    return _cut(corpus_token_stream(tokenizer), 0, prompt_len)


def summarize(requests: Sequence[BenchRequest]) -> WorkloadSummary:
    prompt_lens = [r.prompt_len for r in requests]
    output_lens = [r.output_len for r in requests]
    return WorkloadSummary(
        num_requests=len(requests),
        prompt_tokens=sum(prompt_lens),
        output_tokens=sum(output_lens),
        min_prompt_len=min(prompt_lens),
        max_prompt_len=max(prompt_lens),
        min_output_len=min(output_lens),
        max_output_len=max(output_lens),
    )
