"""Draft-model proposals: a small model decodes k tokens greedily ahead of the target.

The draft model keeps its own KV cache tensor with as many blocks as the target's and reads and
writes it through the target's block tables: the one block manager that pages the target's K/V
pages the draft's too. A block the target copies on write, swaps out or swaps in is copied,
swapped out or swapped in in the draft's cache by the same operations, and the slots of rejected
drafts are given back with the target's.

Per sequence the proposer remembers how many leading tokens have draft K/V; each proposal first
catches up on the tokens since then (the whole prompt the first time, the accepted drafts' bonus
token afterwards) and then decodes one token at a time. Draft K/V only steer proposals: a stale
or missing entry can lower the acceptance rate, never change what the target emits.
"""

from __future__ import annotations

import torch

from quire.attention.backend import AttentionBackend
from quire.config import SpeculativeConfig
from quire.core.request import Request, RequestStatus, Sequence
from quire.core.scheduler import ScheduledSeq, SchedulerOutput
from quire.models.loader import load_model_files, resolve_model_path
from quire.models.registry import build_model
from quire.spec_decode.proposer import may_speculate
from quire.worker.cache_engine import CacheEngine
from quire.worker.model_runner import ModelRunner
from quire.worker.step_inputs import StepInputs, block_ops_of, block_table_tensor


class DraftModelProposer:
    """Loads the draft model and its paged KV cache; proposes greedy drafts for the scheduled chunks.

    Greedy drafts are point-mass proposals: the verifier accepts each with the target's
    probability of it, so sampled requests keep the target's distribution too.
    """

    def __init__(
        self,
        config: SpeculativeConfig,
        attention: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device,
        max_model_len: int,
        vocab_size: int,
        num_blocks: int,
        block_size: int,
        num_host_blocks: int,
    ) -> None:
        self.config = config
        loaded = load_model_files(resolve_model_path(config.model))
        if loaded.config.vocab_size != vocab_size:
            raise ValueError(
                f"speculative_config.model has a vocabulary of {loaded.config.vocab_size} tokens, the target "
                f"{vocab_size}: a draft model must share the target's tokenizer."
            )
        self.model = build_model(loaded, attention, dtype, max_model_len, device)
        self.cache = CacheEngine(loaded.config, num_blocks, block_size, dtype, device, num_host_blocks=num_host_blocks)
        self._runner = ModelRunner(self.model, self.cache, sampler=None)  # forwards only: the draft picks argmaxes
        self._computed: dict[int, tuple[Sequence, int]] = {}  # seq_id -> (sequence, tokens with draft K/V)

    def num_draft_slots(self, request: Request, seq: Sequence, limit: int) -> int:
        return min(self.config.num_speculative_tokens, limit) if may_speculate(request, seq) else 0

    @torch.inference_mode()
    def propose(self, sched: SchedulerOutput) -> None:
        self.cache.apply_block_ops(block_ops_of(sched))
        self._forget(sched)
        chunks = [c for c in sched.scheduled if c.num_draft_slots]
        if not chunks:
            return
        drafts: list[list[int]] = [[] for _ in chunks]
        # First pass: each sequence's tokens without draft K/V yet (at least its newest one).
        starts = [min(self._known(c.seq), len(c.seq.token_ids) - 1) for c in chunks]
        tokens = [c.seq.token_ids[s:] for c, s in zip(chunks, starts, strict=True)]
        for step in range(max(c.num_draft_slots for c in chunks)):
            live = [i for i, c in enumerate(chunks) if len(drafts[i]) < c.num_draft_slots]
            if step > 0:
                tokens = [[drafts[i][-1]] for i in live]
                starts = [len(chunks[i].seq.token_ids) + step - 1 for i in live]
            else:
                tokens = [tokens[i] for i in live]
                starts = [starts[i] for i in live]
            picked = self._greedy([chunks[i] for i in live], tokens, starts)
            for i, token in zip(live, picked, strict=True):
                drafts[i].append(token)
        for chunk, proposed in zip(chunks, drafts, strict=True):
            chunk.set_draft_tokens(proposed)
            # K/V written up to the second-to-last draft; verification decides how much of it stays valid.
            self._computed[chunk.seq.seq_id] = (chunk.seq, len(chunk.seq.token_ids) + len(proposed) - 1)

    def _greedy(self, chunks: list[ScheduledSeq], tokens: list[list[int]], starts: list[int]) -> list[int]:
        """One batched draft forward of ``tokens`` (per chunk, from position ``starts``); each chunk's argmax."""
        lens = torch.tensor([len(t) for t in tokens], dtype=torch.int32)
        query_start_loc = torch.zeros(len(tokens) + 1, dtype=torch.int32)
        torch.cumsum(lens, 0, out=query_start_loc[1:])
        inputs = StepInputs(
            input_ids=torch.tensor([t for ts in tokens for t in ts], dtype=torch.int32),
            query_start_loc=query_start_loc,
            starts=torch.tensor(starts, dtype=torch.int32),
            block_tables=block_table_tensor([c.block_table for c in chunks]),
            logit_rows=query_start_loc[1:] - 1,
        )
        logits = self._runner.run(inputs)
        return logits.argmax(dim=-1).tolist()

    def _known(self, seq: Sequence) -> int:
        """Leading tokens of ``seq`` whose draft K/V are valid: written, and not past what the target kept."""
        entry = self._computed.get(seq.seq_id)
        return min(entry[1], seq.num_computed_tokens) if entry is not None else 0

    def _forget(self, sched: SchedulerOutput) -> None:
        """Drop finished sequences, and those whose blocks a recompute preemption gave away."""
        for request in sched.preempted:
            if request.status is not RequestStatus.SWAPPED:
                for seq in request.seqs:
                    self._computed.pop(seq.seq_id, None)
        done = [seq_id for seq_id, (seq, _) in self._computed.items() if seq.is_finished]
        for seq_id in done:
            del self._computed[seq_id]
