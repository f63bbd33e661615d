"""Prompt lookup (n-gram) drafts: what followed the last time the sequence's latest tokens appeared.

No model runs: repetitive output (edits and summaries of a given text, code that reuses its own
names) is proposed from the prompt and the output so far. vLLM calls it ``ngram``; llama.cpp's
``lookup`` decoding is the same idea.
"""

from __future__ import annotations

from quire.config import SpeculativeConfig
from quire.core.request import Request, Sequence
from quire.core.scheduler import SchedulerOutput
from quire.spec_decode.proposer import may_speculate


def find_ngram_drafts(token_ids: list[int], num_drafts: int, lookup_max: int, lookup_min: int) -> list[int]:
    """Up to ``num_drafts`` tokens that followed the latest earlier occurrence of the sequence's last n tokens.

    n runs from ``lookup_max`` down to ``lookup_min``: the longest suffix that recurs wins, and of
    its occurrences the most recent (the closest context).
    """
    length = len(token_ids)
    if num_drafts <= 0:
        return []
    for n in range(min(lookup_max, length - 1), lookup_min - 1, -1):
        suffix = token_ids[length - n :]
        last = suffix[-1]
        # Occurrences ending before the last token, latest first, so at least one token follows.
        for begin in range(length - n - 1, -1, -1):
            if token_ids[begin + n - 1] == last and token_ids[begin : begin + n] == suffix:
                return token_ids[begin + n : begin + n + num_drafts]
    return []


class NgramProposer:
    """Proposes ``num_speculative_tokens`` drafts by prompt lookup; a sequence without a match drafts none.

    The lookup runs when the scheduler plans the step (so only matched sequences reserve slots)
    and its drafts are handed over when the step is proposed; nothing changes the tokens in between.
    """

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self._planned: dict[int, list[int]] = {}  # seq_id -> drafts, for the step being scheduled

    def num_draft_slots(self, request: Request, seq: Sequence, limit: int) -> int:
        if not may_speculate(request, seq):
            return 0
        c = self.config
        drafts = find_ngram_drafts(
            seq.token_ids, min(c.num_speculative_tokens, limit), c.prompt_lookup_max, c.prompt_lookup_min
        )
        if drafts:
            self._planned[seq.seq_id] = drafts
        return len(drafts)

    def propose(self, sched: SchedulerOutput) -> None:
        planned, self._planned = self._planned, {}
        for chunk in sched.scheduled:
            if chunk.num_draft_slots:
                chunk.set_draft_tokens(planned[chunk.seq.seq_id][: chunk.num_draft_slots])
