"""Each constrained sequence's grammar matcher: advanced per accepted token, forked, dropped.

The output processor adds a matcher when a constrained request arrives, forks it with the
sequence (``n`` / ``best_of``), advances it with every token the sequence accepts and drops it
when the sequence finishes or is aborted. Preemption needs nothing: a preempted sequence keeps
its tokens (a recompute replays them through the model, not through the grammar), so its matcher
is still right when it runs again. The model runner reads the matchers to build a step's masks.
"""

from __future__ import annotations

import torch
import xgrammar as xgr

from quire.core.request import Sequence


class GrammarStates:
    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._matchers: dict[Sequence, xgr.GrammarMatcher] = {}

    def __contains__(self, seq: Sequence) -> bool:
        return seq in self._matchers

    def __len__(self) -> int:
        return len(self._matchers)

    def add(self, seq: Sequence, grammar: xgr.CompiledGrammar) -> None:
        self._matchers[seq] = xgr.GrammarMatcher(grammar)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        if parent in self._matchers:
            self._matchers[child] = self._matchers[parent].fork()

    def accept(self, seq: Sequence, token_id: int) -> bool:
        """Advance ``seq``'s matcher by ``token_id``; False if the grammar refuses it (nothing changes then)."""
        return self._matchers[seq].accept_token(token_id)

    def is_terminated(self, seq: Sequence) -> bool:
        """The grammar is complete and its stop token accepted: nothing may follow."""
        return self._matchers[seq].is_terminated()

    def drop(self, seq: Sequence) -> None:
        self._matchers.pop(seq, None)

    def fill(self, seqs: list[Sequence], rows: list[int], bitmask: torch.Tensor) -> None:
        """Row ``rows[i]`` of ``bitmask`` ([batch, words] int32): the tokens ``seqs[i]``'s grammar allows next."""
        for seq, row in zip(seqs, rows, strict=True):
            self._matchers[seq].fill_next_token_bitmask(bitmask, row)
