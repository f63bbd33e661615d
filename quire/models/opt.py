"""OPT, the paper's model family: learned positions (offset by 2), ReLU FFN, LayerNorm, biases everywhere.

OPT-350m's variants are covered too: post-LayerNorm (``do_layer_norm_before=False``) and
embeddings narrower than the hidden size (``project_in`` / ``project_out``).
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
from quire.models.linear import Linear
from quire.models.parallel_layers import ParallelLMHead, VocabParallelEmbedding

# OPT's learned position table starts with 2 unused rows (fairseq's padding offset).
POSITION_OFFSET = 2

_NAMES = {  # checkpoint module suffix inside a layer -> (this model's module, fused part)
    "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
    "self_attn.out_proj": ("self_attn.o_proj", ""),
    "self_attn_layer_norm": ("attn_norm", ""),
    "final_layer_norm": ("ffn_norm", ""),
    "fc1": ("mlp.fc1", ""),
    "fc2": ("mlp.fc2", ""),
}


class OPTForCausalLM(CausalLM):
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
        hidden = config.hidden_size
        dim = config.word_embed_proj_dim or hidden
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, dim, group)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, hidden)
        self.project_in = Linear(dim, hidden) if dim != hidden else None
        self.project_out = Linear(hidden, dim) if dim != hidden else None
        self.layers = nn.ModuleList(
            LayerNormDecoderLayer(config, backend, ops, group) for _ in range(config.num_layers)
        )
        # OPT keeps a final LayerNorm only in its pre-norm models.
        self.final_layer_norm = LayerNorm(hidden, config.rms_norm_eps) if config.do_layer_norm_before else None
        tied = self.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(dim, config.vocab_size, group, tied)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        hidden = hidden + self.embed_positions(positions + POSITION_OFFSET)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(hidden, kv_cache, metadata)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden

    def map_weight(self, name: str, tensor: torch.Tensor | None) -> list[Target]:
        """``model.decoder.layers.0.self_attn.q_proj.weight`` ... to this model's modules."""
        name = name.removeprefix("model.").removeprefix("decoder.")
        if name == "lm_head.weight" and self.lm_head.tied:
            return []
        module, _, param = name.rpartition(".")
        if module.startswith("layers."):
            _, index, rest = module.split(".", 2)
            if rest in _NAMES:
                target, part = _NAMES[rest]
                return [(f"layers.{index}.{target}", param, part, tensor)]
        return [(module, param, "", tensor)]
