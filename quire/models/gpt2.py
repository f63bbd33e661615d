"""GPT-2: learned positions, fused ``c_attn``, GELU (tanh approximation), LayerNorm, biases.

Its checkpoints store linear weights in ``Conv1D`` layout ([in, out], the transpose of
nn.Linear's), which ``map_weight`` turns around; ``c_attn`` is split into q, k and v so each rank
takes the rows of its own heads.
"""

from __future__ import annotations

import torch
from torch import nn

from quire.attention.backend import AttentionBackend, AttentionMetadata
from quire.distributed.comm import TPGroup
from quire.models.blocks import LayerNorm, LayerNormDecoderLayer
from quire.models.causal_lm import CausalLM, Target
from quire.models.config import ArchConfig
from quire.models.layer_ops import layer_ops
from quire.models.parallel_layers import ParallelLMHead, VocabParallelEmbedding

_NAMES = {  # checkpoint module suffix inside a block -> this model's module (Conv1D weights transposed)
    "ln_1": "attn_norm",
    "attn.c_proj": "self_attn.o_proj",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


class GPT2LMHeadModel(CausalLM):
    def __init__(
        self,
        config: ArchConfig,
        backend: AttentionBackend,
        max_positions: int,
        use_fused_ops: bool = True,
        group: TPGroup | None = None,
    ) -> None:
        super().__init__()
        group = group or TPGroup()
        self.config = config
        self.ops = ops = layer_ops(use_fused_ops)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, group)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(
            LayerNormDecoderLayer(config, backend, ops, group) for _ in range(config.num_layers)
        )
        self.final_norm = LayerNorm(config.hidden_size, config.rms_norm_eps)
        tied = self.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, group, tied)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) + self.embed_positions(positions)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(hidden, kv_cache, metadata)
        return self.final_norm(hidden)

    def map_weight(self, name: str, tensor: torch.Tensor | None) -> list[Target]:
        name = name.removeprefix("transformer.")
        if name == "lm_head.weight" and self.lm_head.tied:
            return []
        module, _, param = name.rpartition(".")
        if module == "wte":
            return [("embed_tokens", param, "", tensor)]
        if module == "wpe":
            return [("embed_positions", param, "", tensor)]
        if module == "ln_f":
            return [("final_norm", param, "", tensor)]
        if not module.startswith("h."):
            return [(module, param, "", tensor)]
        _, index, rest = module.split(".", 2)
        if rest == "attn" and param in ("bias", "masked_bias"):
            return []  # old checkpoints' causal-mask buffers
        if tensor is not None and param == "weight":
            tensor = tensor.t()  # Conv1D [in, out] -> [out, in]
        if rest == "attn.c_attn":
            parts = tensor.chunk(3, dim=0) if tensor is not None else (None,) * 3
            return [(f"layers.{index}.self_attn.qkv_proj", param, p, t) for p, t in zip("qkv", parts, strict=True)]
        return [(f"layers.{index}.{_NAMES.get(rest, rest)}", param, "", tensor)]
