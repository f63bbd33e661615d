"""The layers every family is assembled from: norms, attention over the paged KV cache, feed-forwards.

Attention is one module for all families: a column-parallel fused q|k|v projection, optional
per-head q/k RMSNorm (Qwen3) and rotation (rotary families), the paged attention backend on this
rank's heads, and a row-parallel output projection. Families differ only in which options they
turn on and how they name their weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quire.attention.backend import AttentionBackend, AttentionMetadata
from quire.distributed.comm import TPGroup
from quire.distributed.partition import head_shard, split_range
from quire.models.config import ArchConfig
from quire.models.parallel_layers import ColumnParallelLinear, RowParallelLinear


class RMSNorm(nn.Module):
    """Residual add + RMSNorm in one op: ``forward(x, residual) -> (normed, x + residual)``."""

    def __init__(self, dim: int, eps: float, ops) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.ops = eps, ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (OPT, GPT-2)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class Attention(nn.Module):
    """Self-attention on this rank's heads: q|k|v rows of its heads, o columns of its heads."""

    def __init__(
        self,
        config: ArchConfig,
        backend: AttentionBackend,
        ops,
        group: TPGroup,
        qkv_bias: bool = False,
        o_bias: bool = False,
        rotary: bool = True,
    ) -> None:
        super().__init__()
        shard = head_shard(config.num_heads, config.num_kv_heads, group.size, group.rank)
        d = self.head_dim = config.head_dim
        self.num_heads, self.num_kv_heads = len(shard.q_heads), len(shard.kv_heads)
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        q_rows = range(shard.q_heads.start * d, shard.q_heads.stop * d)
        kv_rows = range(shard.kv_heads.start * d, shard.kv_heads.stop * d)
        q_full, kv_full = config.num_heads * d, config.num_kv_heads * d
        parts = {"q": (q_full, q_rows), "k": (kv_full, kv_rows), "v": (kv_full, kv_rows)}
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, parts, bias=qkv_bias)
        self.o_proj = RowParallelLinear(q_full, config.hidden_size, q_rows, group, bias=o_bias)
        if config.qk_norm:
            self.q_norm = nn.Parameter(torch.ones(d))
            self.k_norm = nn.Parameter(torch.ones(d))
        self.qk_norm, self.eps = config.qk_norm, config.rms_norm_eps
        self.rotary = rotary
        self.scale = d**-0.5
        self.ops, self.backend = ops, backend
        # Rotation, cache write and attention in one compiled call when the backend and the
        # rotary tables (the fused ops' float32 cos/sin) allow it.
        self.fused = backend.fuses_qkv and ops.kernels is not None and not config.qk_norm

    def forward(
        self,
        hidden: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        # Sub-modules are called through ``forward``: nn.Module.__call__ costs ~2 us, which over the
        # ~10 modules of 30 layers is ~0.5 ms of a ~15 ms one-token decode step.
        tokens, d = hidden.shape[0], self.head_dim
        qkv = self.qkv_proj.forward(hidden)
        if self.fused:
            out = self.backend.forward_qkv(
                qkv, rotary if self.rotary else None, self.num_heads, self.num_kv_heads, *kv_cache, metadata, self.scale
            )
            return self.o_proj.forward(out)
        if self.qk_norm:
            self._norm_heads(qkv)
        heads = self.num_heads + self.num_kv_heads
        if self.rotary:  # rotate q and k heads in one pass
            qk = self.ops.rotate(qkv, rotary, heads, d)
        else:
            qk = qkv[:, : heads * d].view(tokens, heads, d)
        query, key = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        value = qkv[:, self.q_size + self.kv_size :].view(tokens, self.num_kv_heads, d)
        out = self.backend.forward(query, key, value, kv_cache[0], kv_cache[1], metadata, self.scale)
        return self.o_proj.forward(out.view(tokens, self.q_size))

    def _norm_heads(self, qkv: torch.Tensor) -> None:
        """Qwen3: RMSNorm over each q and k head (before the rotation), in place."""
        tokens, d = qkv.shape[0], self.head_dim
        q = qkv[:, : self.q_size].view(tokens, self.num_heads, d)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(tokens, self.num_kv_heads, d)
        q.copy_(F.rms_norm(q, (d,), self.q_norm, self.eps))
        k.copy_(F.rms_norm(k, (d,), self.k_norm, self.eps))


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate|up column-parallel and down row-parallel."""

    def __init__(self, config: ArchConfig, ops, group: TPGroup) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (silu only)")
        full = config.intermediate_size
        cols = split_range(full, group.size, group.rank)
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, {"gate": (full, cols), "up": (full, cols)})
        self.down_proj = RowParallelLinear(full, config.hidden_size, cols, group)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.forward(self.ops.silu_and_mul(self.gate_up_proj.forward(x)))


_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class FeedForward(nn.Module):
    """``fc2(act(fc1(x)))`` with biases (OPT, GPT-2): fc1 column-parallel, fc2 row-parallel."""

    def __init__(self, config: ArchConfig, group: TPGroup) -> None:
        super().__init__()
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"activation {config.hidden_act!r} is not supported ({sorted(_ACTIVATIONS)})")
        full = config.intermediate_size
        cols = split_range(full, group.size, group.rank)
        self.fc1 = ColumnParallelLinear(config.hidden_size, {"": (full, cols)}, bias=True)
        self.fc2 = RowParallelLinear(full, config.hidden_size, cols, group, bias=True)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerNormDecoderLayer(nn.Module):
    """The OPT / GPT-2 layer: LayerNorm, attention with biases and learned positions, LayerNorm, FFN.

    Pre-norm by default; ``do_layer_norm_before=False`` (OPT-350m) normalises after each residual add.
    """

    def __init__(self, config: ArchConfig, backend: AttentionBackend, ops, group: TPGroup) -> None:
        super().__init__()
        self.attn_norm = LayerNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, backend, ops, group, qkv_bias=True, o_bias=True, rotary=False)
        self.ffn_norm = LayerNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = FeedForward(config, group)
        self.pre_norm = config.do_layer_norm_before

    def forward(self, hidden: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        if self.pre_norm:
            hidden = hidden + self.self_attn(self.attn_norm(hidden), None, kv_cache, metadata)
            return hidden + self.mlp(self.ffn_norm(hidden))
        hidden = self.attn_norm(hidden + self.self_attn(hidden, None, kv_cache, metadata))
        return self.ffn_norm(hidden + self.mlp(hidden))
