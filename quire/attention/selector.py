"""Which attention backend a model gets: ``EngineArgs.attention_backend`` resolved for a device."""

from __future__ import annotations

import os

import torch

from quire.attention.torch_backend import TorchAttentionBackend


def build_attention_backend(name: str, device: torch.device):
    """``cpu``: the compiled CPU kernel (pure PyTorch if it cannot build); ``triton``: the Triton
    kernels; ``auto``: triton on a CUDA device, cpu otherwise.

    Triton on a CPU device only works in Triton's interpreter, which must be switched on before
    triton is first imported; asking for it without that is refused here with the reason, rather
    than failing at the first forward.
    """
    if name == "auto":
        name = "triton" if device.type == "cuda" else "cpu"
    if name == "cpu":
        return TorchAttentionBackend()
    if name != "triton":
        raise ValueError(f"unknown attention backend {name!r}")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "attention_backend='triton' on a CPU device needs TRITON_INTERPRET=1 in the environment "
            "(Triton's interpreter, slow: it is meant for testing the GPU kernels)"
        )
    try:
        from quire.attention.triton_backend import TritonAttentionBackend
    except ImportError as exc:
        raise ValueError("attention_backend='triton' needs triton: pip install 'quire[gpu]'") from exc
    return TritonAttentionBackend()
