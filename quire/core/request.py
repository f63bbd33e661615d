"""A request and its sequences as the scheduler sees them: scheduling state only, no tensors.

What a sequence's output looks like to the user (its text, the detokenizer's place in it, its
logprobs, the stop string or token that ended it) is the engine's output processor's business,
kept there per sequence.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from quire.outputs import PositionLogprobs
from quire.sampling_params import SamplingParams

if TYPE_CHECKING:
    from quire.sampling.beam_search import BeamSearch


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted with its K/V moved to the host pool
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One token stream: the prompt plus what was generated for one output of a request.

    ``num_computed_tokens`` counts the tokens whose K/V are in the cache; everything past it
    still has to go through the model (a prompt chunk, a decode token, or a recompute after
    preemption).
    """

    seq_id: int
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int = 0
    cumulative_logprob: float = 0.0  # ranks the sequences of a group (best_of, beam search)
    finish_reason: str | None = None

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Request:
    """A user's request: a prompt, its sampling settings and its sequences.

    The scheduler treats a request as one unit (a sequence group): all of its sequences run,
    are preempted and finish together (all-or-nothing). A request with ``group_size`` > 1
    (``best_of`` / ``n`` parallel samples, or beam search) starts as one sequence that prefills
    the prompt and forks when the prompt's last chunk samples.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_order: int  # engine-wide counter: FCFS order and the preemption victim choice
    arrival_time: float
    seqs: list[Sequence]
    eos_token_id: int | None
    priority: int = 0
    status: RequestStatus = RequestStatus.WAITING
    group_size: int = 1  # sequences the request forks into: best_of (or n), or the beam width
    # Random generators when params.seed is set, one per sequence index (seed + index); owned by the engine.
    generators: list[Any] | None = None
    beam: BeamSearch | None = None  # beam-search state for beam-search requests
    cache_salt: str | None = None  # extra key in the prefix-cache hashes: only requests with the same salt share
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    # The structured-output constraint compiled for the vocabulary (quire.structured), opaque here.
    grammar: Any = None
    bad_words_token_ids: list[list[int]] = field(default_factory=list)  # params.bad_words as token sequences
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    queued_at_step: int = 0  # scheduler step at which it last entered the waiting or swapped queue
    promoted: bool = False  # starvation guard: waited too long, now ahead of every unpromoted request
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def unfinished_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished]

    @property
    def forked(self) -> bool:
        """True once the prompt sequence has sampled (and, for a group, forked)."""
        if len(self.seqs) != 1:
            return True
        return self.seqs[0].num_output_tokens > 0

    @property
    def max_running_seqs(self) -> int:
        """The most sequences this request can run at once from now on (the scheduler's seat count)."""
        return len(self.unfinished_seqs) if self.forked else self.group_size

    def generator_for(self, index: int) -> Any:
        return self.generators[index] if self.generators is not None else None

    @property
    def is_finished(self) -> bool:
        if self.beam is not None:
            return self.beam.done
        return all(s.is_finished for s in self.seqs)

    def abort(self) -> None:
        """End every sequence still running (and the beam search): the request is finished from now on."""
        for seq in self.unfinished_seqs:
            seq.finish_reason = "abort"
        if self.beam is not None:
            self.beam.abort()
