"""A user's request (prompt, sampling or beam-search parameters) checked and turned into a ready ``Request``.

Every check that can fail happens here, before the request touches the scheduler, so a bad
request is refused with a ``ValueError`` and leaves no trace: no sequence id, no arrival slot.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Container, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from quire.config import SchedulerConfig
from quire.core.kv_cache_manager import KVCacheManager
from quire.core.request import Request, Sequence
from quire.core.scheduler import Scheduler
from quire.sampling.beam_search import BeamSearch
from quire.sampling_params import BeamSearchParams, SamplingParams

if TYPE_CHECKING:
    from quire.structured.compiler import StructuredOutputCompiler

Prompt = str | list[int] | dict


@dataclass(frozen=True)
class _Group:
    """How many sequences a request runs, and the parameter that says so (for error messages)."""

    size: int
    name: str  # "n", "best_of" or "beam_width"


class InputProcessor:
    """Converts parameters, tokenizes and validates prompts, sets up beam search and seeds."""

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        max_model_len: int,
        eos_token_id: int | None,
        seq_ids: Iterator[int],
        live_request_ids: Container[str],
        grammar_compiler: StructuredOutputCompiler | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_id = eos_token_id
        self._seq_ids = seq_ids  # shared with the output processor, which numbers the forks
        self._live = live_request_ids  # ids in use: a new request may not reuse one
        self._arrivals = itertools.count()  # FCFS order across all requests
        self._grammars = grammar_compiler  # None: the engine takes no structured_outputs

    def process(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | BeamSearchParams | None,
        arrival_time: float | None,
        priority: int,
        scheduler: Scheduler,
    ) -> Request:
        """A request ready for the scheduler, or a ``ValueError`` saying what is wrong with it.

        ``scheduler`` is the one the request will run on: its limits and its KV pool decide
        whether the request's sequences can ever run together.
        """
        sampling, beam_params = _as_sampling_params(params or SamplingParams())
        self._check_request(request_id, priority, scheduler.config)
        group = _group(sampling, beam_params)
        _check_group_size(group, scheduler.config)
        self._check_token_ids(sampling)
        grammar = self._compile(sampling)
        text, token_ids = self._tokenize(prompt)
        if group.size > 1:
            self._check_group_fits(len(token_ids), group, sampling.max_tokens, scheduler)
        beam = None
        if beam_params is not None:
            max_new = min(beam_params.max_tokens, max(1, self.max_model_len - len(token_ids)))
            beam = BeamSearch(beam_params, None if beam_params.ignore_eos else self.eos_token_id, max_new)
        seq = Sequence(seq_id=next(self._seq_ids), index=0, token_ids=list(token_ids), num_prompt_tokens=len(token_ids))
        return Request(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=list(token_ids),
            params=sampling,
            arrival_order=next(self._arrivals),
            arrival_time=arrival_time if arrival_time is not None else time.time(),
            seqs=[seq],
            eos_token_id=self.eos_token_id,
            priority=priority,
            group_size=group.size,
            generators=_generators(sampling.seed, group.size),
            beam=beam,
            cache_salt=prompt.get("cache_salt") if isinstance(prompt, dict) else None,
            prompt_logprobs=[None] if sampling.prompt_logprobs is not None else None,
            grammar=grammar,
            bad_words_token_ids=self._bad_words(sampling.bad_words or []),
        )

    def _check_request(self, request_id: str, priority: int, limits: SchedulerConfig) -> None:
        if request_id in self._live:
            raise ValueError(f"request_id {request_id!r} is already in use.")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}.")
        if priority != 0 and limits.policy != "priority":
            raise ValueError(f"priority={priority} needs scheduling_policy='priority' (the engine uses 'fcfs').")

    def _check_token_ids(self, params: SamplingParams) -> None:
        vocab = self.vocab_size
        controls = {"logit_bias": params.logit_bias or {}, "allowed_token_ids": params.allowed_token_ids or []}
        for name, ids in controls.items():
            outside = [t for t in ids if t >= vocab]
            if outside:
                raise ValueError(f"{name} has token ids outside the vocabulary [0, {vocab}): {outside[:5]}.")

    def _compile(self, params: SamplingParams):
        """The compiled grammar of ``params.structured_outputs`` (None without one)."""
        if params.structured_outputs is None:
            return None
        if self._grammars is None:
            raise ValueError("structured_outputs is not available: this engine has no grammar compiler.")
        return self._grammars.compile(params.structured_outputs)

    def _bad_words(self, words: list[str]) -> list[list[int]]:
        """Each bad word as token ids, alone and after a space (how it appears mid-text), as vLLM bans them."""
        sequences: list[list[int]] = []
        for word in words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in sequences:
                    sequences.append(ids)
        return sequences

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """The prompt's text (if given) and its token ids, checked against the vocabulary and ``max_model_len``."""
        text, token_ids = _split_prompt(prompt)
        if token_ids is None:
            if not isinstance(text, str):
                raise ValueError("prompt must be a string.")
            token_ids = self.tokenizer.encode(text, add_special_tokens=True)
        token_ids = list(token_ids)
        if not token_ids:
            raise ValueError("prompt is empty: it must contain at least one token.")
        vocab = self.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt_token_ids must be integers in [0, {vocab}).")
        if len(token_ids) > self.max_model_len:
            raise ValueError(f"prompt is too long: {len(token_ids)} tokens, max_model_len is {self.max_model_len}.")
        return text, token_ids

    def _check_group_fits(self, prompt_len: int, group: _Group, max_tokens: int | None, scheduler: Scheduler) -> None:
        """A group must fit in the whole pool even unshared (as after a recompute), or it could never finish."""
        kv_cache = scheduler.kv_cache
        if not isinstance(kv_cache, KVCacheManager):  # reservation allocators share no blocks
            raise ValueError(f"{group.name}={group.size} needs shared KV blocks: kv_allocator must be 'paged'.")
        longest = min(prompt_len + (max_tokens or self.max_model_len), self.max_model_len)
        needed = group.size * -(-longest // kv_cache.block_size)
        if needed > kv_cache.pool.num_blocks:
            raise ValueError(
                f"{group.name}={group.size} sequences of up to {longest} tokens may need {needed} KV blocks, more "
                f"than the {kv_cache.pool.num_blocks} in the cache; lower {group.name} or max_tokens."
            )


def _as_sampling_params(params: SamplingParams | BeamSearchParams) -> tuple[SamplingParams, BeamSearchParams | None]:
    """Beam search runs as greedy sampling that returns each beam's ``2 * beam_width`` best candidates."""
    if isinstance(params, BeamSearchParams):
        sampling = SamplingParams(
            temperature=0.0,
            max_tokens=params.max_tokens,
            ignore_eos=params.ignore_eos,
            logprobs=2 * params.beam_width,
            structured_outputs=params.structured_outputs,
        )
        return sampling, params
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}.")
    return params, None


def _group(params: SamplingParams, beam_params: BeamSearchParams | None) -> _Group:
    if beam_params is not None:
        return _Group(beam_params.beam_width, "beam_width")
    return _Group(params.num_seqs, "best_of" if params.best_of is not None else "n")


def _check_group_size(group: _Group, limits: SchedulerConfig) -> None:
    """A group's sequences run together: they must fit in one step."""
    if group.size > min(limits.max_num_seqs, limits.max_num_batched_tokens):
        raise ValueError(
            f"{group.name}={group.size} is more sequences than the engine runs at once "
            f"(max_num_seqs={limits.max_num_seqs}, max_num_batched_tokens={limits.max_num_batched_tokens})."
        )


def _split_prompt(prompt: Prompt) -> tuple[str | None, list[int] | None]:
    """(text, token ids) as given; one of them may be None."""
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), prompt["prompt_token_ids"]
        if "prompt" in prompt:
            return prompt["prompt"], None
        raise ValueError("prompt dict must have 'prompt' or 'prompt_token_ids'.")
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list | tuple):
        return None, prompt
    raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}.")


def _generators(seed: int | None, group_size: int) -> list[torch.Generator] | None:
    """With a seed, sequence ``i`` draws from ``seed + i`` (vLLM's convention)."""
    if seed is None:
        return None
    return [torch.Generator().manual_seed(seed + i) for i in range(group_size)]
