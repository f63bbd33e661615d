"""Logprobs in the shape outputs carry them: per position, ``{token id: Logprob(logprob, rank, text)}``."""

from __future__ import annotations

from dataclasses import dataclass

from quire.core.request import Request
from quire.outputs import Logprob, PositionLogprobs
from quire.sampling.sampler import SamplerOutput
from quire.worker.model_runner import PromptLogprobs


@dataclass(frozen=True)
class SampledRows:
    """A step's samples as Python lists, one row per sampled sequence.

    The sampler's tensors are converted once per step: reading them element by element would
    cost a tensor access per token.
    """

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int] | None  # only when some request asked for logprobs
    top_ids: list[list[int]] | None  # top candidates, best first
    top_lps: list[list[float]] | None

    @classmethod
    def of(cls, samples: SamplerOutput) -> SampledRows:
        def rows(tensor):
            return tensor.tolist() if tensor is not None else None

        return cls(
            samples.token_ids.tolist(),
            samples.logprobs.tolist(),
            rows(samples.ranks),
            rows(samples.top_token_ids),
            rows(samples.top_logprobs),
        )


class LogprobsBuilder:
    """Builds position logprobs with each candidate's text.

    Every candidate is decoded on its own, and the same few thousand tokens keep coming back,
    so their texts are cached.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._token_text: dict[int, str] = {}

    def sampled(self, rows: SampledRows, row: int, k: int | None) -> PositionLogprobs:
        """The sampled token of ``row`` and (with ``k``) its ``k`` best candidates."""
        assert rows.ranks is not None, "the sampler ranks the tokens of rows that asked for logprobs"
        top_ids = rows.top_ids[row][:k] if k and rows.top_ids is not None else []
        top_lps = rows.top_lps[row][:k] if k and rows.top_lps is not None else []
        return self.position(rows.token_ids[row], rows.logprobs[row], rows.ranks[row], top_ids, top_lps)

    def append_prompt(self, request: Request, scored: PromptLogprobs) -> None:
        """Extend ``request.prompt_logprobs`` with the prompt positions one step scored (they arrive in order)."""
        assert request.prompt_logprobs is not None and len(request.prompt_logprobs) == scored.first_token
        token_ids, lps, ranks = scored.token_ids.tolist(), scored.logprobs.tolist(), scored.ranks.tolist()
        none: list[list] = [[]] * len(token_ids)
        top_ids = scored.top_token_ids.tolist() if scored.top_token_ids is not None else none
        top_lps = scored.top_logprobs.tolist() if scored.top_logprobs is not None else none
        for i, token in enumerate(token_ids):
            request.prompt_logprobs.append(self.position(token, lps[i], ranks[i], top_ids[i], top_lps[i]))

    def position(
        self, token: int, logprob: float, rank: int, top_ids: list[int], top_lps: list[float]
    ) -> PositionLogprobs:
        """``token`` first, then the top candidates it is not among, ranked 1.. in the order given."""
        entry = {token: Logprob(logprob, rank, self._decoded(token))}
        for i, (tid, lp) in enumerate(zip(top_ids, top_lps, strict=True)):
            if tid not in entry:
                entry[tid] = Logprob(lp, i + 1, self._decoded(tid))
        return entry

    def _decoded(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text
