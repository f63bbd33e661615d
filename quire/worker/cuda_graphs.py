"""Decode steps replayed from CUDA graphs, one per batch-size bucket.

A decode step of a small model on a GPU is mostly kernel launches: hundreds of small kernels whose
launch cost exceeds their run time. A CUDA graph records them once and replays them with one
launch. A graph replays the exact kernels it recorded, on the exact buffers, so:

- the step's tensors are copied into static buffers sized for the largest bucket, and the batch is
  padded up to the next bucket; padding rows write their K/V into a scratch block that no sequence
  owns (``scratch_block``, one block past the scheduler's pool) and attend to it alone;
- the block-table buffer is as wide as the longest sequence allows, which also fixes the decode
  kernel's split length (it derives the split from the table width, never from ``seq_lens``);
- only the model's forward is captured: the LM head runs on the rows that need logits afterwards.

On a CPU there is nothing to capture: ``capture=False`` runs the same padded buffers eagerly, which
is how the tests check the padding against the unpadded forward. The CUDA-only lines are
``_capture`` and the ``replay`` call.
"""

from __future__ import annotations

import torch

from quire.attention.backend import AttentionMetadata
from quire.config import EngineArgs
from quire.worker.cache_engine import CacheEngine
from quire.worker.platform import Platform

# vLLM's shape: every size up to 4, then multiples of 8.
_SMALL_BUCKETS = (1, 2, 4)
_BUCKET_STEP = 8


def batch_buckets(max_batch: int) -> list[int]:
    """The captured batch sizes: 1, 2, 4, 8, 16, 24, ... up to ``max_batch`` (always included)."""
    sizes = [b for b in _SMALL_BUCKETS if b < max_batch]
    sizes += list(range(_BUCKET_STEP, max_batch, _BUCKET_STEP))
    return sorted({*sizes, max_batch})


class DecodeGraphs:
    """Runs pure decode steps (one query row per sequence) of at most ``max_batch`` sequences.

    Args:
        model: the prepared model (its forward takes ids, positions, KV caches, metadata).
        kv_layers: the cache's per-layer (key, value) views.
        scratch_block: a KV block that no sequence is ever given (padding rows write there).
        block_size: tokens per KV block.
        max_blocks_per_seq: block-table width (``max_model_len`` in blocks).
        max_batch: the largest bucket; larger decode steps run eagerly.
        capture: record CUDA graphs (a CUDA device); False runs the padded buffers eagerly.
    """

    def __init__(
        self,
        model,
        kv_layers,
        scratch_block: int,
        block_size: int,
        max_blocks_per_seq: int,
        max_batch: int,
        device: torch.device,
        capture: bool,
    ) -> None:
        self.model, self.kv_layers = model, kv_layers
        self.block_size = block_size
        self.buckets = batch_buckets(max_batch)
        self.capture = capture
        n = self.buckets[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), scratch_block * block_size, dtype=torch.long, device=device)
        self.block_tables = torch.full((n, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self._scratch = scratch_block
        self._graphs: dict[int, tuple[object, torch.Tensor]] = {}  # bucket -> (graph, its output)

    def fits(self, num_tokens: int, metadata: AttentionMetadata) -> bool:
        """Whether this step is a decode step these buffers hold."""
        return (
            metadata.max_query_len == 1
            and num_tokens == metadata.seq_lens.shape[0]
            and num_tokens <= self.buckets[-1]
            and metadata.block_tables.shape[1] <= self.block_tables.shape[1]
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """The hidden states of the step's rows, computed on the bucket's padded buffers."""
        n = input_ids.shape[0]
        bucket = next(b for b in self.buckets if b >= n)
        width = metadata.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(metadata.slot_mapping)
        self.block_tables[:n, :width].copy_(metadata.block_tables)
        self.block_tables[:n, width:].fill_(self._scratch)
        self.seq_lens[:n].copy_(metadata.seq_lens)
        # Padding rows (a larger step may have left real rows there): token 0 at position 0, written
        # into the scratch block, attending to it alone.
        self.input_ids[n:bucket].zero_()
        self.positions[n:bucket].zero_()
        self.slot_mapping[n:bucket].fill_(self._scratch * self.block_size)
        self.block_tables[n:bucket].fill_(self._scratch)
        self.seq_lens[n:bucket].fill_(1)
        if not self.capture:
            return self._run(bucket)[:n]
        if bucket not in self._graphs:
            self._graphs[bucket] = self._capture(bucket)
        graph, out = self._graphs[bucket]
        graph.replay()
        return out[:n]

    def _run(self, bucket: int) -> torch.Tensor:
        metadata = AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket],
            block_tables=self.block_tables[:bucket],
            query_start_loc=self.query_start_loc[: bucket + 1],
            seq_lens=self.seq_lens[:bucket],
            max_query_len=1,
        )
        return self.model(self.input_ids[:bucket], self.positions[:bucket], self.kv_layers, metadata)

    def _capture(self, bucket: int) -> tuple[object, torch.Tensor]:
        """Warm up (lazy initialisation and autotuning must not happen inside the capture), then record."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._run(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._run(bucket)
        return graph, out


# The largest captured batch: larger decode steps are long enough that launches no longer dominate.
MAX_GRAPH_BATCH = 256


def uses_decode_graphs(args: EngineArgs, platform: Platform) -> bool:
    """Graphs on a CUDA device unless ``enforce_eager``; never on a CPU (nothing to capture)."""
    return platform.is_cuda and not args.enforce_eager


def build_decode_graphs(
    args: EngineArgs, platform: Platform, model, cache: CacheEngine, num_blocks: int, max_model_len: int
) -> DecodeGraphs | None:
    """The engine's decode graphs, or None; ``cache`` then holds one block past ``num_blocks``, the scratch block."""
    if not uses_decode_graphs(args, platform):
        return None
    return DecodeGraphs(
        model,
        cache.layers,
        scratch_block=num_blocks,
        block_size=cache.block_size,
        max_blocks_per_seq=-(-max_model_len // cache.block_size),
        max_batch=min(args.max_num_seqs, MAX_GRAPH_BATCH),
        device=platform.device,
        capture=True,
    )
