"""The rotary family: Llama, Mistral, Qwen2 (q/k/v bias), Qwen3 (per-head q/k RMSNorm).

Written for a flattened batch of tokens from many sequences: there is no batch or padding
dimension; a step's tokens arrive as one row each, with their positions, and attention finds each
token's context through the paged KV cache. The four architectures differ only in options of
``ArchConfig`` (and Mistral/Qwen's sliding window, which caps ``max_model_len``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from quire.attention.backend import AttentionBackend, AttentionMetadata
from quire.distributed.comm import TPGroup
from quire.models.blocks import Attention, GatedMLP, RMSNorm
from quire.models.calibration import LinearPlan
from quire.models.causal_lm import CausalLM, Target
from quire.models.config import ArchConfig
from quire.models.layer_ops import layer_ops
from quire.models.layer_stack import LayerStack
from quire.models.parallel_layers import ParallelLMHead, VocabParallelEmbedding


def rope_inv_freq(config: ArchConfig) -> torch.Tensor:
    """Rotary inverse frequencies, including the ``linear`` and ``llama3`` scalings."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise NotImplementedError(f"rope_scaling type {kind!r} is not supported")


class RotaryEmbedding(nn.Module):
    """Precomputed float32 cos/sin per position; ``layer_ops`` applies them (half-split layout)."""

    def __init__(self, config: ArchConfig, max_positions: int) -> None:
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(config))
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos and sin for each token, [tokens, head_dim / 2]: once per step, used by every layer."""
        return self.cos[positions], self.sin[positions]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ArchConfig, backend: AttentionBackend, ops, group: TPGroup) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.self_attn = Attention(config, backend, ops, group, qkv_bias=config.qkv_bias, o_bias=config.o_bias)
        self.mlp = GatedMLP(config, ops, group)

    def forward(self, hidden, residual, rotary, kv_cache, metadata):
        """Returns (this layer's MLP output, the residual stream before it); the next layer adds them."""
        normed, residual = self.input_layernorm.forward(hidden, residual)  # .forward: see Attention.forward
        attn = self.self_attn.forward(normed, rotary, kv_cache, metadata)
        normed, residual = self.post_attention_layernorm.forward(attn, residual)
        return self.mlp.forward(normed), residual


# Checkpoint projections fused into one weight here: their module suffix -> (fused module, part).
_FUSED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}


class LlamaForCausalLM(CausalLM):
    """Token ids and positions in, hidden states out; ``compute_logits`` for the rows that need them."""

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
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, backend, ops, group) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        tied = self.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, group, tied)
        self.rotary = RotaryEmbedding(config, max_positions)
        self._stack: LayerStack | None = None

    def prepare(self, plans: dict[torch.dtype, LinearPlan] | None = None) -> LlamaForCausalLM:
        super().prepare(plans)
        self._stack = LayerStack.build(self.layers, self.ops.kernels)
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        rotary = self.ops.rotary_tables(*self.rotary.lookup(positions), hidden.dtype)
        if self._stack is not None and hidden.shape[0] <= self._stack.rows:
            hidden, residual = self._stack(hidden, rotary, kv_caches, metadata)
        else:
            residual = None
            for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
                hidden, residual = layer.forward(hidden, residual, rotary, kv_cache, metadata)
        return self.norm(hidden, residual)[0]

    def map_weight(self, name: str, tensor: torch.Tensor | None) -> list[Target]:
        """Hugging Face names (``model.layers.0.self_attn.q_proj.weight`` ...) to this model's modules."""
        name = name.removeprefix("model.")
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.lm_head.tied):
            return []
        module, _, param = name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        if leaf in _FUSED:
            fused, part = _FUSED[leaf]
            return [(f"{parent}.{fused}", param, part, tensor)]
        if leaf in ("q_norm", "k_norm"):  # Qwen3: per-head norms are parameters of the attention module
            return [(parent, leaf, "", tensor)]
        return [(module, param, "", tensor)]
