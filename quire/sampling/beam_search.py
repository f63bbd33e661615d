"""Beam-search bookkeeping for one request: which beams survive a step, which hypotheses finish.

Pure Python, no tensors: the engine hands in each live beam's top ``2 * beam_width`` candidate
tokens (from the full log-softmax of its logits) and gets back the next beams as (parent, token)
pairs, which it turns into block-table forks and frees on the KV cache manager.

The selection reproduces ``transformers``' ``generate(num_beams=k, do_sample=False,
num_return_sequences=k, length_penalty=..., early_stopping=False)`` (its vectorised
``_beam_search``), so the returned sequences, their order and their scores match it:

- Candidates: the ``2k`` best (beam score + token log-probability) over all live beams. The
  first step has one beam (the prompt), as transformers' ``-1e9`` on the copies makes it.
- A candidate *finishes* when its token is EOS (unless ``ignore_eos``) or it reaches
  ``max_tokens`` (or the model's length limit). Only finishing candidates ranked among the first
  ``k`` become hypotheses; finishing candidates ranked ``k..2k-1`` are dropped.
- The ``k`` best non-finishing candidates are the next live beams.
- Length normalisation: a hypothesis scores ``cum_logprob / generated_len ** length_penalty``,
  where ``generated_len`` counts the generated tokens including the EOS token (the prompt is not
  counted). The ``k`` best hypotheses are kept.
- Stopping (``early_stopping=False``, transformers' default): the search ends when every
  candidate of a step finishes (``max_tokens`` reached), or once ``k`` hypotheses exist and the
  best live beam's score divided by the current generated length ``** length_penalty`` no
  longer beats the worst kept hypothesis.
- Arithmetic follows transformers' float32: scores are rounded to float32 after each addition.

Results are the ``k`` hypotheses, best first. Unlike vLLM's ``LLM.beam_search`` (which ranks by
a score whose length includes the prompt and drops the EOS token from it), the length penalty
here is transformers'.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from quire.sampling_params import BeamSearchParams


def _f32(value: float) -> float:
    return array("f", [value])[0]


@dataclass
class BeamHypothesis:
    """A finished beam: its generated tokens (EOS included), cumulative logprob and length-penalised score."""

    token_ids: list[int]
    cum_logprob: float
    score: float
    finish_reason: str  # "stop" (EOS) or "length"


@dataclass
class BeamCandidate:
    """A live beam for the next step: ``parent`` (index into the beams passed in) extended by ``token_id``."""

    parent: int
    token_id: int
    cum_logprob: float


@dataclass
class BeamSearch:
    """The state of one request's beam search between steps."""

    params: BeamSearchParams
    eos_token_id: int | None
    max_new_tokens: int  # min(max_tokens, what max_model_len leaves after the prompt)
    num_generated: int = 0
    finished: list[BeamHypothesis] = field(default_factory=list)
    done: bool = False
    _improvable: bool = True

    @property
    def width(self) -> int:
        return self.params.beam_width

    def abort(self) -> None:
        """End the search early (the request was aborted): ``finished`` keeps what it has."""
        self.done = True

    @property
    def num_candidates(self) -> int:
        """Top tokens each live beam has to provide per step."""
        return 2 * self.params.beam_width

    def step(self, beams: list[tuple[list[int], float, list[int], list[float]]]) -> list[BeamCandidate]:
        """Advance by one token.

        ``beams``: for every live beam, in order, (its generated tokens, its cumulative logprob,
        its top candidate token ids, their log-probabilities, best first). Returns the next live
        beams, best first; sets ``done`` when the search is over (then the result is ``finished``).
        """
        k, num_candidates = self.width, self.num_candidates
        candidates = [
            BeamCandidate(b, token, _f32(cum + lp))
            for b, (_, cum, ids, lps) in enumerate(beams)
            for token, lp in zip(ids[:num_candidates], lps[:num_candidates], strict=True)
        ]
        candidates.sort(key=lambda c: -c.cum_logprob)  # stable: ties keep beam order
        candidates = candidates[:num_candidates]
        gen_len = self.num_generated + 1
        at_limit = gen_len >= self.max_new_tokens
        penalty = float(gen_len) ** self.params.length_penalty

        def finishes(c: BeamCandidate) -> bool:
            return at_limit or (not self.params.ignore_eos and c.token_id == self.eos_token_id)

        if self._improvable:
            for c in candidates[:k]:
                if finishes(c):
                    self.finished.append(
                        BeamHypothesis(
                            token_ids=[*beams[c.parent][0], c.token_id],
                            cum_logprob=c.cum_logprob,
                            score=_f32(c.cum_logprob / penalty),
                            finish_reason="stop"
                            if (not self.params.ignore_eos and c.token_id == self.eos_token_id)
                            else "length",
                        )
                    )
            self.finished.sort(key=lambda h: -h.score)
            del self.finished[k:]
        survivors = [c for c in candidates if not finishes(c)][:k]
        self.num_generated = gen_len
        if len(self.finished) == k and survivors:
            best_possible = survivors[0].cum_logprob / penalty
            self._improvable = best_possible > self.finished[-1].score
        if not survivors or not self._improvable:
            self.done = True
            return []
        return survivors
