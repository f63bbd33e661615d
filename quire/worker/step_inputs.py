"""One model step as a handful of int32 tensors: what the driver broadcasts to tensor-parallel workers.

Only the step's own data travels: the token ids being computed, where each sequence's chunk starts,
the block tables, the rows whose logits are wanted and the block operations (every
``blocks_to_*`` list of ``SchedulerOutput`` that ``CacheEngine`` knows). Positions, slot mapping
and sequence lengths are derived from these on each rank by the same code (``StepInputs.batch``),
so the driver and the workers build identical attention metadata. On the wire a step is two
broadcasts: a fixed int32 header of sizes, then one int32 payload.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from quire.attention.backend import AttentionMetadata
from quire.core.scheduler import SchedulerOutput
from quire.distributed.comm import TPGroup
from quire.worker.cache_engine import BLOCK_OPS
from quire.worker.platform import Platform

HEADER_LEN = 16
assert 5 + len(BLOCK_OPS) <= HEADER_LEN, "the header holds 5 sizes and one count per block operation"
_STEP, _STOP = 1, 2


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # int32 [tokens]
    query_start_loc: torch.Tensor  # int32 [seqs + 1]: sequence s owns rows query_start_loc[s]:[s+1]
    starts: torch.Tensor  # int32 [seqs]: tokens of the sequence already in the cache
    block_tables: torch.Tensor  # int32 [seqs, width], padded with 0
    logit_rows: torch.Tensor  # int32 [rows]: hidden rows whose logits are computed
    block_ops: dict[str, torch.Tensor] = field(default_factory=dict)  # BLOCK_OPS name -> int32 [n, 2]

    def batch(
        self, block_size: int, platform: Platform
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """(token ids, positions, attention metadata, logit rows) for the forward, on the platform's
        device: derived on the host, then moved in one copy (``Platform.upload``)."""
        query_start_loc, starts = self.query_start_loc, self.starts
        query_lens = query_start_loc[1:] - query_start_loc[:-1]
        num_tokens = self.input_ids.shape[0]
        # Position of every flattened token: its row index shifted by where its sequence starts.
        shift = torch.repeat_interleave(query_start_loc[:-1] - starts, query_lens, output_size=num_tokens)
        positions = torch.arange(num_tokens, dtype=torch.int32) - shift
        seq_of_token = torch.repeat_interleave(
            torch.arange(len(starts)), query_lens, output_size=num_tokens
        )
        blocks = self.block_tables[seq_of_token, (positions // block_size).long()].long()
        slot_mapping = blocks * block_size + (positions % block_size).long()
        input_ids, positions, slot_mapping, block_tables, query_start_loc, seq_lens, logit_rows = platform.upload(
            [
                self.input_ids.long(),
                positions.long(),
                slot_mapping,
                self.block_tables,
                query_start_loc,
                starts + query_lens,
                self.logit_rows.long(),
            ]
        )
        metadata = AttentionMetadata(
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            max_query_len=int(query_lens.max()),
        )
        return input_ids, positions, metadata, logit_rows

    # -- the wire ---------------------------------------------------------------------------------

    def send(self, group: TPGroup) -> None:
        """Driver: broadcast this step to the other ranks."""
        ops = [self.block_ops.get(name, _NO_PAIRS).to(torch.int32).view(-1, 2) for name in BLOCK_OPS]
        sizes = [
            _STEP,
            self.input_ids.shape[0],
            self.starts.shape[0],
            self.block_tables.shape[1],
            self.logit_rows.shape[0],
            *(len(op) for op in ops),
        ]
        header = torch.zeros(HEADER_LEN, dtype=torch.int32)
        header[: len(sizes)] = torch.tensor(sizes, dtype=torch.int32)
        payload = torch.cat(
            [
                self.input_ids.to(torch.int32),
                self.query_start_loc,
                self.starts,
                self.block_tables.reshape(-1),
                self.logit_rows.to(torch.int32),
                *(op.reshape(-1) for op in ops),
            ]
        )
        group.broadcast(header)
        group.broadcast(payload)

    @classmethod
    def receive(cls, group: TPGroup) -> StepInputs | None:
        """Worker: wait for the driver's next step; None when the driver stops the group."""
        header = group.broadcast(torch.zeros(HEADER_LEN, dtype=torch.int32))
        kind, tokens, seqs, width, rows, *op_sizes = header.tolist()
        if kind == _STOP:
            return None
        if kind != _STEP:
            raise RuntimeError(f"unexpected message kind {kind} from the driver")
        op_sizes = op_sizes[: len(BLOCK_OPS)]
        lengths = [tokens, seqs + 1, seqs, seqs * width, rows, *(2 * n for n in op_sizes)]
        payload = group.broadcast(torch.empty(sum(lengths), dtype=torch.int32))
        ids, qsl, starts, tables, logit_rows, *ops = payload.split(lengths)
        return cls(
            input_ids=ids,
            query_start_loc=qsl,
            starts=starts,
            block_tables=tables.view(seqs, width),
            logit_rows=logit_rows,
            block_ops={name: op.view(-1, 2) for name, op in zip(BLOCK_OPS, ops, strict=True) if len(op)},
        )


def block_ops_of(sched: SchedulerOutput) -> dict[str, torch.Tensor]:
    """Every non-empty ``blocks_to_*`` list of a scheduler output as an int32 [n, 2] tensor, by name.

    They travel as-is: ``CacheEngine.apply_block_ops`` knows which method runs each.
    """
    return {
        f.name: torch.tensor(getattr(sched, f.name), dtype=torch.int32).view(-1, 2)
        for f in dataclasses.fields(sched)
        if f.name.startswith("blocks_to_") and getattr(sched, f.name)
    }


def block_table_tensor(tables: list[list[int]]) -> torch.Tensor:
    """Block tables as one int32 [seqs, widest] tensor, padded with block 0 (never read past ``seq_lens``)."""
    width = max((len(t) for t in tables), default=1)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


def send_stop(group: TPGroup) -> None:
    """Driver: tell the workers to leave their loop."""
    header = torch.zeros(HEADER_LEN, dtype=torch.int32)
    header[0] = _STOP
    group.broadcast(header)


_NO_PAIRS = torch.zeros(0, 2, dtype=torch.int32)
