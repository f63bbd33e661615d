"""What every model family shares: logits for chosen rows, fast-path set-up, checkpoint loading.

A family maps each checkpoint name to the module, parameter and fused part it fills
(``map_weight``); the layers themselves slice what their rank holds (``parallel_layers``), so a
family needs no tensor-parallel code of its own.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from quire.kernels.cpu_kernel import isa_level
from quire.models.calibration import LinearPlan, linear_plan
from quire.models.linear import Linear
from quire.models.loader import BlockQuantized
from quire.models.parallel_layers import ColumnParallelLinear, ParallelLMHead

# (module name, parameter name, fused part or "", tensor) — what one checkpoint tensor fills.
logger = logging.getLogger(__name__)

Target = tuple[str, str, str, torch.Tensor | None]


class CausalLM(nn.Module):
    """Subclasses set ``config``, ``ops``, ``embed_tokens`` and ``lm_head``; they implement ``forward``
    and ``map_weight``."""

    lm_head: ParallelLMHead

    def map_weight(self, name: str, tensor: torch.Tensor | None) -> list[Target]:
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """float32 logits of ``hidden``'s rows over the whole vocabulary (None on non-driver ranks)."""
        return self.lm_head.compute_logits(hidden)

    def linear_traffic(self, rows: int) -> tuple[int, int]:
        """(weight bytes read, multiply-add FLOPs) of every linear layer (LM head included) for a ``rows``-row step."""
        layers = [m for m in self.modules() if isinstance(m, Linear)]
        return (
            sum(layer.weight_bytes_read(rows) for layer in layers),
            sum(2 * rows * layer.in_features * layer.out_features for layer in layers),
        )

    def prepare(self, plans: dict[torch.dtype, LinearPlan] | None = None) -> CausalLM:
        """Set up the linear layers' fast paths; call after the weights are loaded and cast.

        Float weights that no path reads any more are freed; a tied LM head's is the embedding
        table, which stays.

        Args:
            plans: per dtype, the paths to use instead of the calibrated ones (for a test or a
                benchmark that needs a given path whatever this CPU measures).
        """
        plans = dict(plans or {})
        for module in self.modules():
            if isinstance(module, Linear):
                dtype = module.weight.dtype
                if dtype not in plans:
                    plans[dtype] = linear_plan(self.ops.kernels, dtype)
                    if self.ops.kernels is not None:
                        logger.info("CPU kernels %s; %s linears: %s", isa_level(), dtype, plans[dtype].describe())
                module.prepare(self.ops.kernels, plans[dtype])
                if not (module is self.lm_head and self.lm_head.tied):
                    module.release_weight()
        return self

    def load_weights(
        self, weights: dict[str, torch.Tensor], quantized: dict[str, BlockQuantized] | None = None
    ) -> None:
        """Fill every parameter from checkpoint tensors (Hugging Face names); fail on unknown or missing ones.

        ``quantized`` (GGUF block-format copies of some weights, same names) goes to the linear
        layers that can use it; a tied LM head takes the embedding's.
        """
        modules = dict(self.named_modules())
        loaded: set[tuple[str, str, str]] = set()
        for name, tensor in weights.items():
            for module_name, param, part, value in self.map_weight(name, tensor):
                module = modules.get(module_name)
                if module is None or getattr(module, param, None) is None:
                    raise ValueError(f"unexpected weight {name!r} in checkpoint")
                if hasattr(module, "load"):
                    module.load(param, value, part)
                else:
                    _copy(getattr(module, param), value, name)
                loaded.add((module_name, param, part))
        for name, blocks in (quantized or {}).items():
            for module_name, param, part, _ in self.map_weight(name, None):
                module = modules.get(module_name)
                if param == "weight" and hasattr(module, "load_quantized"):
                    module.load_quantized(blocks, part)
                if module is self.embed_tokens and self.lm_head.tied:
                    self.lm_head.load_quantized(blocks)
        missing = sorted(f"{m}.{p}{f'[{part}]' if part else ''}" for m, p, part in self._expected() - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks weights: {missing[:5]}{'...' if len(missing) > 5 else ''}")

    def _expected(self) -> set[tuple[str, str, str]]:
        expected = set()
        for module_name, module in self.named_modules():
            for param, _ in module.named_parameters(recurse=False):
                if module is self.lm_head and self.lm_head.tied:
                    continue
                parts = module.parts if isinstance(module, ColumnParallelLinear) else {"": None}
                expected.update((module_name, param, part) for part in parts)
        return expected


def _copy(param: nn.Parameter, tensor: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"weight {name}: expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}")
    with torch.no_grad():
        param.copy_(tensor)
