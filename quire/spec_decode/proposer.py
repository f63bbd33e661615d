"""What every proposer shares: which sequences may speculate, and the interface the engine drives."""

from __future__ import annotations

from typing import Protocol

from quire.core.request import Request, Sequence
from quire.core.scheduler import SchedulerOutput


def may_speculate(request: Request, seq: Sequence) -> bool:
    """Whether ``seq``'s next tokens can be verified k at a time exactly.

    Beam search picks its beams from every candidate of a position, and penalties, the
    ``min_tokens`` ban, ``bad_words`` and a grammar change each position's distribution by the
    tokens before it; such sequences decode one token at a time (a ``min_tokens`` sequence only
    until it has them). ``logit_bias`` and ``allowed_token_ids`` are not applied to verified
    positions, so they decode one token at a time too.
    """
    params = request.params
    if request.grammar is not None or params.logit_bias or params.allowed_token_ids or params.bad_words:
        return False
    return request.beam is None and not params.uses_penalties and seq.num_output_tokens >= params.min_tokens


class Proposer(Protocol):
    """Plans draft slots for the scheduler (``DraftPlanner``), then fills them in once they are allocated."""

    def num_draft_slots(self, request: Request, seq: Sequence, limit: int) -> int:
        """Draft tokens to reserve for ``seq``'s next step (0 for none), at most ``limit``."""
        ...

    def propose(self, sched: SchedulerOutput) -> None:
        """Fill in the drafts of every chunk the schedule reserved slots for (``set_draft_tokens``)."""
        ...
