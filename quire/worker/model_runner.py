"""SchedulerOutput → one flattened batch → model → sampler → per-sequence results.

``execute`` (driver) turns the scheduler's decision into ``StepInputs`` tensors, sends them to
the tensor-parallel workers if there are any, and runs ``run`` like every worker does: block
operations, forward, logits. Sampling and everything per-request stay on the driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from quire.core.scheduler import ScheduledSeq, SchedulerOutput
from quire.distributed.comm import TPGroup
from quire.models.causal_lm import CausalLM
from quire.sampling import token_bitmask
from quire.sampling.rejection_sampler import DraftVerifier, VerifiedDrafts
from quire.sampling.sampler import Sampler, SamplerOutput, SamplingBatch
from quire.worker.cache_engine import CacheEngine
from quire.worker.cuda_graphs import DecodeGraphs
from quire.worker.step_inputs import StepInputs, block_ops_of, block_table_tensor

if TYPE_CHECKING:
    from quire.structured.state import GrammarStates


@dataclass
class PromptLogprobs:
    """Logprobs of prompt tokens ``first_token`` .. computed in this step for one sequence."""

    first_token: int
    token_ids: torch.Tensor  # [n] the prompt tokens being scored
    logprobs: torch.Tensor  # [n]
    ranks: torch.Tensor  # [n]
    top_token_ids: torch.Tensor | None  # [n, k]
    top_logprobs: torch.Tensor | None


@dataclass
class RunnerOutput:
    """What one step produced: a sample for every entry of ``sampled_seqs``, in that order, and the
    verification of the chunks in ``drafted`` (speculative decoding), in that order."""

    sampled_seqs: list[ScheduledSeq]
    samples: SamplerOutput | None
    prompt_logprobs: list[tuple[ScheduledSeq, PromptLogprobs]] = field(default_factory=list)
    drafted: list[ScheduledSeq] = field(default_factory=list)
    verified: VerifiedDrafts | None = None


class ModelRunner:
    """Turns the scheduler's decision into tensors once, runs the model, samples."""

    def __init__(
        self,
        model: CausalLM,
        cache: CacheEngine,
        sampler: Sampler | None,
        group: TPGroup | None = None,
        graphs: DecodeGraphs | None = None,
        grammars: GrammarStates | None = None,
    ) -> None:
        self.model = model
        self.grammars = grammars  # constrained sequences' matchers (driver only), read for the masks
        self.cache = cache
        self.sampler = sampler  # None on tensor-parallel workers: they never sample
        self.graphs = graphs  # decode steps replayed from CUDA graphs (None: every step eager)
        self.verifier = DraftVerifier(sampler) if sampler is not None else None
        self.group = group or TPGroup()
        self.block_size = cache.block_size
        self.vocab_size = model.config.vocab_size

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        entries = sched.scheduled
        # Rows whose logits we need: the last token of every chunk that completes its
        # sequence (to sample), and prompt positions whose logprobs were asked for.
        ends = []
        end = 0
        for e in entries:
            end += e.num_new_tokens
            ends.append(end)
        # A parallel-sampling group forking at the end of its prompt samples its last row once per child.
        # Chunks with drafts are verified apart: all k + 1 of their last rows (speculative decoding).
        sampled: list[ScheduledSeq] = []
        sample_rows: list[int] = []
        drafted: list[ScheduledSeq] = []
        draft_rows: list[int] = []
        for e, end in zip(entries, ends, strict=True):
            if e.num_draft_slots:
                drafted.append(e)
                draft_rows.extend(range(end - 1 - e.num_draft_slots, end))
            elif e.samples:
                sampled += [e] * e.num_samples
                sample_rows += [end - 1] * e.num_samples
        prompt_rows: list[tuple[ScheduledSeq, int, int]] = []  # (entry, first position, row offset)
        extra_rows: list[int] = []
        for i, e in enumerate(entries):
            if e.request.params.prompt_logprobs is None or e.request.prompt_logprobs is None:
                continue
            # Logits at position p score prompt token p + 1; skip positions already scored.
            first = max(e.start, len(e.request.prompt_logprobs) - 1)
            last = min(e.start + e.num_new_tokens, e.seq.num_prompt_tokens - 1)
            if first < last:
                row0 = ends[i] - e.num_new_tokens + (first - e.start)
                prompt_rows.append((e, first, len(sample_rows) + len(extra_rows)))
                extra_rows.extend(range(row0, row0 + last - first))

        inputs = self._step_inputs(sched, sample_rows + extra_rows + draft_rows)
        if self.group.size > 1:
            inputs.send(self.group)
        logits = self.run(inputs)
        if logits is None:
            return RunnerOutput(sampled_seqs=[], samples=None)
        samples = None
        if sampled:
            samples = self.sampler(logits[: len(sample_rows)], self._sampling_batch(sampled).to(logits.device))
        out = RunnerOutput(sampled_seqs=sampled, samples=samples, drafted=drafted)
        if drafted:
            draft_logits = logits[len(sample_rows) + len(extra_rows) :]
            drafts = [e.draft_token_ids for e in drafted]
            out.verified = self.verifier(draft_logits, self._sampling_batch(drafted).to(logits.device), drafts)
        for entry, first, offset in prompt_rows:
            out.prompt_logprobs.append((entry, self._prompt_logprobs(entry, first, logits, offset)))
        return out

    @torch.inference_mode()
    def run(self, inputs: StepInputs) -> torch.Tensor | None:
        """Block operations, the forward, and the logits of ``inputs.logit_rows`` (None if none, or off the driver).

        Every rank runs this with the same inputs; the model's collectives keep them in step.
        """
        self.cache.apply_block_ops(inputs.block_ops)
        if not len(inputs.input_ids):  # a step that only swapped a group out
            return None
        input_ids, positions, metadata, logit_rows = inputs.batch(self.block_size, self.cache.platform)
        if self.graphs is not None and self.graphs.fits(input_ids.shape[0], metadata):
            hidden = self.graphs.forward(input_ids, positions, metadata)
        else:
            hidden = self.model(input_ids, positions, self.cache.layers, metadata)
        if not len(logit_rows):
            return None
        return self.model.compute_logits(hidden.index_select(0, logit_rows))

    @staticmethod
    def _step_inputs(sched: SchedulerOutput, logit_rows: list[int]) -> StepInputs:
        entries = sched.scheduled
        ids: list[int] = []
        for e in entries:
            ids += e.input_token_ids
        query_lens = torch.tensor([e.num_new_tokens for e in entries], dtype=torch.int32)
        query_start_loc = torch.zeros(len(entries) + 1, dtype=torch.int32)
        torch.cumsum(query_lens, 0, out=query_start_loc[1:])
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.int32),
            query_start_loc=query_start_loc,
            starts=torch.tensor([e.start for e in entries], dtype=torch.int32),
            block_tables=block_table_tensor([e.block_table for e in entries]),
            logit_rows=torch.tensor(logit_rows, dtype=torch.int32),
            block_ops=block_ops_of(sched),
        )

    def _sampling_batch(self, entries: list[ScheduledSeq]) -> SamplingBatch:
        params = [e.request.params for e in entries]
        wants_logprobs = [p.logprobs for p in params if p.logprobs is not None]
        batch = SamplingBatch(
            temperature=torch.tensor([0.0 if p.greedy else p.temperature for p in params]),
            top_p=torch.tensor([p.top_p for p in params]),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long),
            min_p=torch.tensor([p.min_p for p in params]),
            generators=_row_generators(entries),
            num_logprobs=max(wants_logprobs) if wants_logprobs else -1,
        )
        if any(p.uses_penalties for p in params):
            batch.presence_penalty = torch.tensor([p.presence_penalty for p in params])
            batch.frequency_penalty = torch.tensor([p.frequency_penalty for p in params])
            batch.repetition_penalty = torch.tensor([p.repetition_penalty for p in params])
            batch.output_tokens = _pad([e.seq.output_token_ids for e in entries], self.vocab_size)
            batch.prompt_tokens = _pad([e.request.prompt_token_ids for e in entries], self.vocab_size)
        banned_rows: list[int] = []
        banned_tokens: list[int] = []
        for row, e in enumerate(entries):
            if e.seq.num_output_tokens < e.request.params.min_tokens:
                stops = list(e.request.params.stop_token_ids)
                if e.request.eos_token_id is not None and not e.request.params.ignore_eos:
                    stops.append(e.request.eos_token_id)
                banned_rows += [row] * len(stops)
                banned_tokens += stops
            if e.request.bad_words_token_ids:
                bad = _bad_word_tokens(e.request.bad_words_token_ids, e.seq.output_token_ids)
                banned_rows += [row] * len(bad)
                banned_tokens += bad
        if banned_rows:
            batch.banned_rows = torch.tensor(banned_rows, dtype=torch.long)
            batch.banned_tokens = torch.tensor(banned_tokens, dtype=torch.long)
        biased = [(row, p.logit_bias) for row, p in enumerate(params) if p.logit_bias]
        if biased:
            batch.bias_rows = torch.tensor([row for row, bias in biased for _ in bias], dtype=torch.long)
            batch.bias_tokens = torch.tensor([t for _, bias in biased for t in bias], dtype=torch.long)
            batch.bias_values = torch.tensor([v for _, bias in biased for v in bias.values()])
        self._token_masks(entries, batch)
        return batch

    def _token_masks(self, entries: list[ScheduledSeq], batch: SamplingBatch) -> None:
        """The packed allowed-token mask of every row with a grammar or ``allowed_token_ids``; no mask otherwise."""
        grammars = self.grammars
        guided = [grammars is not None and e.seq in grammars for e in entries]
        rows = [row for row, e in enumerate(entries) if guided[row] or e.request.params.allowed_token_ids]
        if not rows:
            return
        bitmask = token_bitmask.all_allowed(len(entries), self.vocab_size)
        if grammars is not None and any(guided):
            guided_rows = [row for row in rows if guided[row]]
            grammars.fill([entries[row].seq for row in guided_rows], guided_rows, bitmask)
        for row in rows:
            allowed = entries[row].request.params.allowed_token_ids
            if allowed:
                bitmask[row] &= token_bitmask.pack(allowed, self.vocab_size)
        batch.masked_rows = rows
        batch.token_bitmask = bitmask
        beams = [row for row in rows if entries[row].request.beam is not None]
        batch.masked_top_rows = beams or None

    def _prompt_logprobs(self, entry: ScheduledSeq, first: int, logits: torch.Tensor, offset: int) -> PromptLogprobs:
        last = min(entry.start + entry.num_new_tokens, entry.seq.num_prompt_tokens - 1)
        n = last - first
        logprobs = torch.log_softmax(logits[offset : offset + n], dim=-1)
        targets = torch.tensor(entry.seq.token_ids[first + 1 : last + 1], dtype=torch.long, device=logits.device)
        chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
        k = entry.request.params.prompt_logprobs
        top = logprobs.topk(k, dim=-1) if k else None
        return PromptLogprobs(
            first_token=first + 1,
            token_ids=targets,
            logprobs=chosen,
            ranks=(logprobs > chosen.unsqueeze(1)).sum(dim=1) + 1,
            top_token_ids=top.indices if top else None,
            top_logprobs=top.values if top else None,
        )


def _row_generators(entries: list[ScheduledSeq]) -> list[torch.Generator | None]:
    """Each row's seeded generator: sequence ``index``'s, or child ``i``'s for the ``i``-th row of a fork."""
    generators = []
    child = 0
    for i, e in enumerate(entries):
        child = child + 1 if i > 0 and entries[i - 1] is e else 0
        generators.append(e.request.generator_for(e.seq.index + child))
    return generators


def _bad_word_tokens(words: list[list[int]], output: list[int]) -> list[int]:
    """vLLM's rule: a bad word's last token is banned when the output ends with the rest of the word."""
    banned = []
    for word in words:
        prefix = word[:-1]
        if not prefix or (len(output) >= len(prefix) and output[-len(prefix) :] == prefix):
            banned.append(word[-1])
    return banned


def _pad(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
