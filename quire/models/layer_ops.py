"""The element-wise pieces of a Llama layer, fused in C++ when the CPU extension built, else PyTorch.

Both implementations have the same contract, so the model code has one path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quire.kernels import cpu_kernel


class TorchLayerOps:
    """Reference implementation in plain PyTorch ops."""

    kernels = None  # no compiled ops: linear layers use PyTorch too

    @staticmethod
    def add_rms_norm(
        x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (rms_norm(x + residual) * weight, x + residual); no residual means x alone."""
        residual = x if residual is None else residual + x
        return F.rms_norm(residual, (residual.shape[-1],), weight, eps), residual

    @staticmethod
    def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def rotary_tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype):
        return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)

    @staticmethod
    def rotate(qkv: torch.Tensor, tables, num_heads: int, head_dim: int) -> torch.Tensor:
        """Rotate the first ``num_heads`` heads of each row of ``qkv``; returns them as [T, heads, dim]."""
        cos, sin = tables
        x = qkv[:, : num_heads * head_dim].view(qkv.shape[0], num_heads, head_dim)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class FusedLayerOps:
    """One vectorised pass over memory per op (``quire/kernels/csrc/fused_ops.cpp``), float32 and bf16."""

    def __init__(self, kernels) -> None:
        self.kernels = kernels

    def add_rms_norm(self, x, residual, weight, eps):
        return self.kernels.add_rms_norm(x, residual, weight, eps), (x if residual is None else residual)

    def silu_and_mul(self, gate_up):
        return self.kernels.silu_and_mul(gate_up)

    @staticmethod
    def rotary_tables(cos, sin, dtype):
        return cos.contiguous(), sin.contiguous()

    def rotate(self, qkv, tables, num_heads, head_dim):
        self.kernels.rotary_inplace(qkv, tables[0], tables[1], num_heads, head_dim)
        return qkv[:, : num_heads * head_dim].view(qkv.shape[0], num_heads, head_dim)


def layer_ops(use_fused: bool = True) -> TorchLayerOps | FusedLayerOps:
    ops = cpu_kernel.fused_ops() if use_fused else None
    return FusedLayerOps(ops) if ops is not None else TorchLayerOps()
