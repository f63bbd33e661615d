"""The Triton attention backend: the GPU path, also runnable on CPU under the Triton interpreter."""

from __future__ import annotations

import torch

from quire.attention.backend import AttentionMetadata


class TritonAttentionBackend:
    """Writes each new token's K/V into its cache slot, then attends through the block tables,
    both with the Triton kernels of :mod:`quire.kernels.triton_attention`.

    CPU tensors work only when ``TRITON_INTERPRET=1`` was set before triton was imported (the
    kernels then run in Triton's interpreter, slowly: it is the way to test them without a GPU).
    """

    # Rotation stays in the model; there is no fused q|k|v entry point on this path.
    fuses_qkv = False
    use_kernel = False  # not the CPU extension (``LLMEngine.model_info`` reads this)

    def __init__(self, num_kv_splits: int = 8) -> None:
        # Imported here so that importing this module (and the engine) does not need triton.
        from quire.kernels import triton_attention

        self._ops = triton_attention
        self.num_kv_splits = num_kv_splits

    def forward_qkv(self, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError("TritonAttentionBackend does not fuse q|k|v; call forward")

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        self._ops.write_kv(key, value, key_cache, value_cache, metadata.slot_mapping)
        return self._ops.paged_attention(
            query,
            key_cache,
            value_cache,
            metadata.block_tables,
            metadata.query_start_loc,
            metadata.seq_lens,
            scale,
            metadata.max_query_len,
            num_kv_splits=self.num_kv_splits,
        )
