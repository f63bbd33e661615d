"""What a request's output is made of between steps, and the ``RequestOutput`` built from it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from quire.core.request import Request, Sequence
from quire.engine.detokenizer import DecodeState
from quire.outputs import CompletionOutput, PositionLogprobs, RequestOutput


@dataclass
class SeqOutput:
    """A sequence's output beyond its tokens, which the scheduler never needs.

    Kept by the output processor per sequence: the text so far (with the detokenizer's place in
    the tokens), the logprobs if the request asked for them, and the stop string or token that
    ended the sequence.
    """

    decode: DecodeState
    logprobs: list[PositionLogprobs] | None = None
    stop_reason: int | str | None = None

    def fork(self) -> SeqOutput:
        """A copy for a child sequence, which goes on from the same text and logprobs."""
        logprobs = list(self.logprobs) if self.logprobs is not None else None
        return SeqOutput(dataclasses.replace(self.decode), logprobs, self.stop_reason)


class OutputBuilder:
    """Snapshots a request into a ``RequestOutput``: the caller may keep it while the request goes on."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def build(self, request: Request, seq_outputs: Mapping[Sequence, SeqOutput]) -> RequestOutput:
        """The request's outputs so far.

        ``n == best_of``: every sequence, in index order (sequence ``i`` is the one seeded
        ``seed + i``). ``best_of > n``: the ``n`` sequences with the highest cumulative logprob,
        best first, re-indexed 0..n-1 (vLLM v0's choice; while running, the current best ``n``).
        Beam search: the finished hypotheses, best score first.
        """
        if request.beam is not None:
            return self._beam_output(request)
        seqs = request.seqs
        n = request.params.n
        if len(seqs) > n:
            seqs = sorted(seqs, key=lambda s: -s.cumulative_logprob)[:n]
        outputs = []
        for i, seq in enumerate(seqs):
            out = seq_outputs[seq]
            outputs.append(
                CompletionOutput(
                    index=seq.index if len(request.seqs) <= n else i,
                    text=out.decode.text,
                    token_ids=list(seq.output_token_ids),
                    cumulative_logprob=seq.cumulative_logprob,
                    logprobs=list(out.logprobs) if out.logprobs is not None else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=out.stop_reason,
                )
            )
        return self._request_output(request, outputs)

    def _beam_output(self, request: Request) -> RequestOutput:
        """The finished hypotheses; when aborted before any finished, what the live beams hold."""
        beam = request.beam
        assert beam is not None
        if beam.finished:
            hyps = [(h.token_ids, h.cum_logprob, h.score, h.finish_reason) for h in beam.finished]
        else:
            hyps = [(s.output_token_ids, s.cumulative_logprob, None, "abort") for s in request.seqs]
        outputs = [
            CompletionOutput(
                index=i,
                text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
                token_ids=list(token_ids),
                cumulative_logprob=cum,
                logprobs=None,
                finish_reason=reason,
                stop_reason=None,
                score=score,
            )
            for i, (token_ids, cum, score, reason) in enumerate(hyps)
        ]
        return self._request_output(request, outputs)

    @staticmethod
    def _request_output(request: Request, outputs: list[CompletionOutput]) -> RequestOutput:
        metrics = {"arrival_time": request.arrival_time, **request.metrics}
        if request.first_token_time is not None:
            metrics["first_token_time"] = request.first_token_time
        if request.finished_time is not None:
            metrics["finished_time"] = request.finished_time
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=list(request.prompt_logprobs) if request.prompt_logprobs is not None else None,
            outputs=outputs,
            finished=request.is_finished,
            metrics=metrics,
        )
