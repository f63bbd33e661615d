"""A step's results applied to the requests: new tokens, forks, beams, stops, text, outputs.

The model runner hands back one sampled token per sampling row; everything per request happens
here, on the driver, in Python: appending the tokens, forking a parallel-sampling group when its
prompt samples, advancing beam searches, stop checks with incremental detokenizing, and the
``RequestOutput`` of every request the step touched. Finished requests leave the scheduler here.

The scheduler is passed to each call rather than held: its blocks back every fork and free, and
the engine's current scheduler is the one to use.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from quire.core.request import Request, Sequence
from quire.core.scheduler import ScheduledSeq, Scheduler
from quire.engine.detokenizer import Detokenizer
from quire.engine.logprobs import LogprobsBuilder, SampledRows
from quire.engine.request_output import OutputBuilder, SeqOutput
from quire.engine.stop_checker import StopChecker
from quire.outputs import RequestOutput
from quire.worker.model_runner import RunnerOutput

if TYPE_CHECKING:
    from quire.structured.state import GrammarStates


class OutputProcessor:
    """Owns the live requests and each sequence's output state (text, detokenizer place, logprobs)."""

    def __init__(
        self, tokenizer, max_model_len: int, seq_ids: Iterator[int], grammars: GrammarStates | None = None
    ) -> None:
        self.requests: dict[str, Request] = {}
        self._seq_ids = seq_ids  # shared with the input processor: ids are engine-wide
        self._outputs: dict[Sequence, SeqOutput] = {}  # beam-search sequences have none
        self._detokenizer = Detokenizer(tokenizer)
        self._stops = StopChecker(self._detokenizer, max_model_len)
        self._logprobs = LogprobsBuilder(tokenizer)
        self._builder = OutputBuilder(tokenizer)
        self.num_generated_tokens = 0
        self._grammars = grammars  # constrained sequences' matchers: added, forked, advanced and dropped here

    def add_request(self, request: Request) -> None:
        """Track a new request (one prompt sequence); its text starts after the prompt."""
        self.requests[request.request_id] = request
        if request.beam is None:  # beams are decoded once, when the search ends
            wants_logprobs = request.params.logprobs is not None
            for seq in request.seqs:
                decode = self._detokenizer.start(seq.num_prompt_tokens)
                self._outputs[seq] = SeqOutput(decode, [] if wants_logprobs else None)
        if request.grammar is not None and self._grammars is not None:
            for seq in request.seqs:
                self._grammars.add(seq, request.grammar)

    def abort(self, request_id: str, scheduler: Scheduler) -> RequestOutput | None:
        """End a live request wherever it is; returns its final output (None if the id is not live)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        request.abort()
        scheduler.finish_request(request)
        return self._final_output(request)

    def update(self, result: RunnerOutput, scheduler: Scheduler) -> list[RequestOutput]:
        """Apply one executed step; returns the outputs of requests that produced tokens or finished.

        A beam-search request reports only when its search ends.
        """
        for entry, scored in result.prompt_logprobs:
            self._logprobs.append_prompt(entry.request, scored)
        touched = self._apply_samples(result, scheduler)
        outputs = []
        for request in touched:
            if request.is_finished:
                self.requests.pop(request.request_id)
                request.finished_time = time.time()
                scheduler.finish_request(request)
                outputs.append(self._final_output(request))
                continue
            if len(request.seqs) > 1:
                for seq in request.seqs:  # a finished member of a group gives its blocks back at once
                    if seq.is_finished:
                        scheduler.free_seq(seq)
                        self._drop_grammar(seq)
            if request.beam is None:
                outputs.append(self._builder.build(request, self._outputs))
        return outputs

    def stats(self) -> dict[str, int]:
        guided = len(self._grammars) if self._grammars is not None else 0
        return {"num_generated_tokens": self.num_generated_tokens, "num_guided_seqs": guided}

    # -- one step's samples -------------------------------------------------------------

    def _apply_samples(self, result: RunnerOutput, scheduler: Scheduler) -> list[Request]:
        """Append every sampled (and verified draft) token; returns the requests that sampled, in order."""
        now = time.time()
        touched: dict[str, Request] = {}
        if result.verified is not None:
            self._apply_verified(result, scheduler, touched, now)
        if result.samples is None:
            return list(touched.values())
        rows = SampledRows.of(result.samples)
        beam_rows: dict[str, list[tuple[Sequence, int]]] = {}
        for entry, row, count in _row_groups(result.sampled_seqs):
            request = entry.request
            if request.first_token_time is None:
                request.first_token_time = now
            touched[request.request_id] = request
            if request.beam is not None:
                beam_rows.setdefault(request.request_id, []).append((entry.seq, row))
            else:
                self._append_samples(request, entry.seq, rows, row, count, scheduler)
        for request_id, beams in beam_rows.items():
            self._beam_step(touched[request_id], beams, rows, scheduler)
        return list(touched.values())

    def _append_samples(
        self, request: Request, seq: Sequence, rows: SampledRows, row: int, count: int, scheduler: Scheduler
    ) -> None:
        """Give ``seq`` the token of ``row``; a prompt sampled ``count`` > 1 times first forks into that many."""
        # Fork before appending: the children copy the parent's state without the new token.
        children = [seq] + [self._fork(seq, index, scheduler) for index in range(1, count)]
        request.seqs += children[1:]
        for child_row, child in enumerate(children, start=row):
            self._append_token(request, child, rows, child_row)

    def _append_token(self, request: Request, seq: Sequence, rows: SampledRows, row: int) -> None:
        """Give ``seq`` the token of ``row`` with its logprobs, and check whether it ends the sequence."""
        if not self._advance_grammar(request, seq, rows.token_ids[row]):
            return
        seq.token_ids.append(rows.token_ids[row])
        seq.cumulative_logprob += rows.logprobs[row]
        out = self._outputs[seq]
        if out.logprobs is not None:
            out.logprobs.append(self._logprobs.sampled(rows, row, request.params.logprobs))
        self.num_generated_tokens += 1
        self._stops.check(request, seq, out)

    def _apply_verified(
        self, result: RunnerOutput, scheduler: Scheduler, touched: dict[str, Request], now: float
    ) -> None:
        """Append each drafting sequence's accepted drafts and the target's next token, one by one.

        Each token goes through the stop checks like a decoded one; a stop ends the sequence there
        and the tokens after it are dropped. The scheduler then counts the accepted drafts as
        computed and gives back the slots of the rest.
        """
        verified = result.verified
        assert verified is not None
        rows = SampledRows.of(verified.samples)
        for entry, first, accepted in zip(result.drafted, verified.first_rows, verified.num_accepted, strict=True):
            request, seq = entry.request, entry.seq
            if request.first_token_time is None:
                request.first_token_time = now
            touched[request.request_id] = request
            for row in range(first, first + accepted + 1):
                if not seq.is_finished:
                    self._append_token(request, seq, rows, row)
            scheduler.accept_drafts(entry, accepted)

    def _advance_grammar(self, request: Request, seq: Sequence, token: int) -> bool:
        """Feed ``token`` to ``seq``'s grammar, if it has one. A refused token (possible only when
        another rule, such as ``min_tokens`` or ``bad_words``, banned every token the grammar allowed)
        is not appended: the sequence ends before it. Returns whether the token is to be appended."""
        if self._grammars is None or seq not in self._grammars or self._grammars.accept(seq, token):
            return True
        out = self._outputs[seq]
        self._detokenizer.update(out.decode, seq.token_ids, request.params.skip_special_tokens, final=True)
        seq.finish_reason = "stop"
        return False

    def _drop_grammar(self, seq: Sequence) -> None:
        if self._grammars is not None:
            self._grammars.drop(seq)

    def _beam_step(
        self, request: Request, rows: list[tuple[Sequence, int]], samples: SampledRows, scheduler: Scheduler
    ) -> None:
        """Pick the next beams of ``request`` from its live beams' top candidates; fork and free blocks to match.

        A parent kept by several new beams is forked (its blocks shared, copied on write when the
        beams diverge inside a block); a parent kept by none releases its blocks at once.
        """
        beam = request.beam
        assert beam is not None and samples.top_ids is not None and samples.top_lps is not None
        parents = [seq for seq, _ in rows]
        assert parents == request.unfinished_seqs, "all live beams of a request sample in the same step"
        survivors = beam.step(
            [(seq.output_token_ids, seq.cumulative_logprob, *self._beam_candidates(seq, samples, r)) for seq, r in rows]
        )
        used: set[int] = set()
        new_beams: list[Sequence] = []
        for candidate in survivors:
            parent = parents[candidate.parent]
            if candidate.parent in used:
                new_beams.append(self._fork(parent, len(new_beams), scheduler))
            else:
                used.add(candidate.parent)
                new_beams.append(parent)
        for i, (seq, candidate) in enumerate(zip(new_beams, survivors, strict=True)):
            seq.index = i
            seq.token_ids.append(candidate.token_id)
            seq.cumulative_logprob = candidate.cum_logprob
            if self._grammars is not None and seq in self._grammars:
                accepted = self._grammars.accept(seq, candidate.token_id)
                assert accepted, "beam candidates come from the grammar's allowed tokens"
        self.num_generated_tokens += len(new_beams)
        for i, parent in enumerate(parents):
            if i not in used:
                scheduler.free_seq(parent)
                self._drop_grammar(parent)
        request.seqs = new_beams

    def _beam_candidates(self, seq: Sequence, samples: SampledRows, row: int) -> tuple[list[int], list[float]]:
        """A beam's candidate tokens and logprobs; a constrained beam's exclude what its grammar forbids (-inf)."""
        assert samples.top_ids is not None and samples.top_lps is not None
        ids, lps = samples.top_ids[row], samples.top_lps[row]
        if self._grammars is None or seq not in self._grammars:
            return ids, lps
        kept = [(t, lp) for t, lp in zip(ids, lps, strict=True) if lp != float("-inf")]
        return [t for t, _ in kept], [lp for _, lp in kept]

    # -- sequences ----------------------------------------------------------------------

    def _fork(self, parent: Sequence, index: int, scheduler: Scheduler) -> Sequence:
        """A new sequence sharing ``parent``'s tokens, state, output so far and KV blocks."""
        child = dataclasses.replace(parent, seq_id=next(self._seq_ids), index=index, token_ids=list(parent.token_ids))
        scheduler.fork(parent, child)
        if self._grammars is not None:
            self._grammars.fork(parent, child)
        if parent in self._outputs:
            self._outputs[child] = self._outputs[parent].fork()
        return child

    def _final_output(self, request: Request) -> RequestOutput:
        """The output of a request that has left the scheduler; its sequences' output state goes with it."""
        output = self._builder.build(request, self._outputs)
        for seq in request.seqs:
            self._outputs.pop(seq, None)
            self._drop_grammar(seq)
        return output


def _row_groups(sampled: list[ScheduledSeq]) -> Iterator[tuple[ScheduledSeq, int, int]]:
    """(entry, first row, row count) per sampling entry: a forking prompt has one row per child, consecutive."""
    row = 0
    while row < len(sampled):
        entry = sampled[row]
        count = 1
        while row + count < len(sampled) and sampled[row + count] is entry:
            count += 1
        yield entry, row, count
        row += count
