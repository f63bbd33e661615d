"""config.json's ``architectures[0]`` → the model class that runs it."""

from __future__ import annotations

import torch

from quire.attention.backend import AttentionBackend
from quire.distributed.comm import TPGroup
from quire.models.calibration import LinearPlan
from quire.models.causal_lm import CausalLM
from quire.models.config import ArchConfig
from quire.models.gpt2 import GPT2LMHeadModel
from quire.models.llama import LlamaForCausalLM
from quire.models.loader import LoadedModel
from quire.models.opt import OPTForCausalLM

MODEL_CLASSES: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
}


def model_class(config: ArchConfig) -> type[CausalLM]:
    cls = MODEL_CLASSES.get(config.architecture)
    if cls is None:
        raise ValueError(f"architecture {config.architecture!r} is not supported (supported: {sorted(MODEL_CLASSES)})")
    return cls


def build_model(
    loaded: LoadedModel,
    backend: AttentionBackend,
    dtype: torch.dtype,
    max_positions: int,
    device: torch.device,
    group: TPGroup | None = None,
    plans: dict[torch.dtype, LinearPlan] | None = None,
) -> CausalLM:
    """This rank's shard of the model, its weights loaded, cast and prepared (linear fast paths;
    ``plans`` overrides the calibrated ones, see ``CausalLM.prepare``)."""
    config = loaded.config
    # The compiled layer ops are CPU code; on another device the model runs PyTorch's.
    model = model_class(config)(
        config, backend, max_positions=max_positions, use_fused_ops=device.type == "cpu", group=group
    )
    model.load_weights(loaded.weights, loaded.quantized)
    model = model.to(device=device, dtype=dtype).eval()
    rotary = getattr(model, "rotary", None)
    if rotary is not None:
        rotary.float()  # cos/sin tables stay float32
    return model.prepare(plans)
