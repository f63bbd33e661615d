"""The architecture facts the model code needs, read from config.json or GGUF metadata.

One dataclass for every family: the fields a family does not use keep their defaults, so the
model registry, the KV cache sizing and the tensor-parallel partition read the same names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ArchConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float  # the norm's epsilon (LayerNorm's too, for OPT and GPT-2)
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "LlamaForCausalLM"  # config.json's ``architectures[0]``: picks the model class
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2; Llama's ``attention_bias``)
    o_bias: bool = False  # the output projection carries one (Llama's ``attention_bias``)
    qk_norm: bool = False  # per-head RMSNorm of q and k before the rotation (Qwen3)
    sliding_window: int | None = None  # Mistral/Qwen: max_model_len is capped to it (no windowed attention)
    hidden_act: str = "silu"
    # Learned-position families (OPT, GPT-2):
    do_layer_norm_before: bool = True  # OPT-350m is post-LayerNorm
    word_embed_proj_dim: int | None = None  # OPT: embeddings narrower than the hidden size (project_in/out)


# The name the Llama-only code used; kept so existing imports keep working.
LlamaArchConfig = ArchConfig
