"""The Llama family, written for a flattened batch of tokens from many sequences.

There is no batch or padding dimension: a step's tokens arrive as one row each, with their
positions, and attention finds each token's context through the paged KV cache.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from quire.attention.backend import AttentionBackend, AttentionMetadata
from quire.models.config import LlamaArchConfig
from quire.models.layer_ops import layer_ops
from quire.models.linear import Linear


def rope_inv_freq(config: LlamaArchConfig) -> torch.Tensor:
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

    def __init__(self, config: LlamaArchConfig, max_positions: int) -> None:
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(config))
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos and sin for each token, [tokens, head_dim / 2]: once per step, used by every layer."""
        return self.cos[positions], self.sin[positions]


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaArchConfig, backend: AttentionBackend, ops) -> None:
        super().__init__()
        self.ops = ops
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # q, k and v in one matmul.
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size)
        self.o_proj = Linear(self.q_size, config.hidden_size)
        self.scale = self.head_dim**-0.5
        self.backend = backend

    def forward(
        self,
        hidden: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        # Rotate q and k heads in one pass.
        qk = self.ops.rotate(qkv, rotary, self.num_heads + self.num_kv_heads, self.head_dim)
        query, key = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        value = qkv[:, self.q_size + self.kv_size :].view(tokens, self.num_kv_heads, self.head_dim)
        out = self.backend.forward(
            query.contiguous(), key, value, kv_cache[0], kv_cache[1], metadata, self.scale
        )
        return self.o_proj(out.view(tokens, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaArchConfig, ops) -> None:
        super().__init__()
        self.ops = ops
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaArchConfig, backend: AttentionBackend, ops) -> None:
        super().__init__()
        self.ops = ops
        self.eps = config.rms_norm_eps
        self.input_layernorm = nn.Parameter(torch.ones(config.hidden_size))
        self.post_attention_layernorm = nn.Parameter(torch.ones(config.hidden_size))
        self.self_attn = LlamaAttention(config, backend, ops)
        self.mlp = LlamaMLP(config, ops)

    def forward(self, hidden, residual, rotary, kv_cache, metadata):
        """Returns (this layer's MLP output, the residual stream before it); the next layer adds them."""
        normed, residual = self.ops.add_rms_norm(hidden, residual, self.input_layernorm, self.eps)
        attn = self.self_attn(normed, rotary, kv_cache, metadata)
        normed, residual = self.ops.add_rms_norm(attn, residual, self.post_attention_layernorm, self.eps)
        return self.mlp(normed), residual


class LlamaForCausalLM(nn.Module):
    """Token ids and positions in, hidden states out; ``compute_logits`` for the rows that need them."""

    def __init__(
        self, config: LlamaArchConfig, backend: AttentionBackend, max_positions: int, use_fused_ops: bool = True
    ) -> None:
        super().__init__()
        self.config = config
        self.ops = layer_ops(use_fused_ops)
        ops = self.ops
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, backend, ops) for _ in range(config.num_layers))
        self.norm = nn.Parameter(torch.ones(config.hidden_size))
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # one tensor, listed once by named_parameters
        self.rotary = RotaryEmbedding(config, max_positions)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        rotary = self.ops.rotary_tables(*self.rotary.lookup(positions), hidden.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, rotary, kv_cache, metadata)
        return self.ops.add_rms_norm(hidden, residual, self.norm, self.config.rms_norm_eps)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def prepare(self) -> LlamaForCausalLM:
        """Set up the linear layers' fast paths; call after the weights are loaded and cast."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepare(self.ops.kernels)
        return self

    def load_weights(self, weights: dict[str, torch.Tensor], quantized: dict | None = None) -> None:
        """Take Hugging Face Llama names (``model.layers.0.self_attn.q_proj.weight`` ...).

        ``quantized`` (GGUF block-format copies of some weights, same names) is handed to the linear
        layers that use them, fused like their float weights.
        """
        self._attach_quantized(quantized or {})
        params = dict(self.named_parameters())
        fused: dict[str, dict[str, torch.Tensor]] = {}
        seen: set[str] = set()
        for name, tensor in weights.items():
            name = name.removeprefix("model.")
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            for part, target in (
                ("q_proj", "qkv_proj"), ("k_proj", "qkv_proj"), ("v_proj", "qkv_proj"),
                ("gate_proj", "gate_up_proj"), ("up_proj", "gate_up_proj"),
            ):
                if f".{part}." in name:
                    fused.setdefault(name.replace(part, target), {})[part] = tensor
                    break
            else:
                name = name.replace("layernorm.weight", "layernorm").replace("norm.weight", "norm")
                if name not in params:
                    raise ValueError(f"unexpected weight {name!r} in checkpoint")
                self._copy(params[name], tensor, name)
                seen.add(name)
        order = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
        for name, parts in fused.items():
            kind = "qkv_proj" if "qkv_proj" in name else "gate_up_proj"
            missing = [p for p in order[kind] if p not in parts]
            if missing:
                raise ValueError(f"checkpoint lacks {missing} for {name}")
            self._copy(params[name], torch.cat([parts[p] for p in order[kind]], dim=0), name)
            seen.add(name)
        absent = sorted(set(params) - seen)
        if absent:
            raise ValueError(f"checkpoint lacks weights: {absent[:5]}{'...' if len(absent) > 5 else ''}")

    def _attach_quantized(self, quantized: dict) -> None:
        modules = dict(self.named_modules())
        parts_of = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
        for module_name, module in modules.items():
            if not isinstance(module, Linear):
                continue
            if module_name == "lm_head":
                names = ["model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"]
            else:
                fused = module_name.rsplit(".", 1)[-1]
                parts = parts_of.get(fused, (fused,))
                names = [f"model.{module_name.replace(fused, p)}.weight" for p in parts]
            found = [quantized.get(n) for n in names]
            if all(q is not None for q in found) and len({q.kind for q in found}) == 1:
                module.quantized = type(found[0])(found[0].kind, torch.cat([q.blocks for q in found]))

    @staticmethod
    def _copy(param: nn.Parameter, tensor: torch.Tensor, name: str) -> None:
        if tuple(param.shape) != tuple(tensor.shape):
            raise ValueError(f"weight {name}: expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}")
        with torch.no_grad():
            param.copy_(tensor)
