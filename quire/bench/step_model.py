"""A model of one engine step's duration, for ``--simulate`` runs at the paper's scale.

    seconds = c0 + c_token * batched_tokens + c_context * attended_tokens

``batched_tokens`` is the number of new tokens in the step (every linear layer's rows);
``attended_tokens`` is the sum over the step's sequences of the K/V positions they attend to
(``start + new tokens``), the bytes the attention kernel reads. ``c0`` is the per-step cost
independent of the batch (reading the weights once, launching / dispatching every layer).

Two sets of coefficients ship:

* ``cpu-smollm2``: least-squares fit (``fit``) to the steps of a real run of the default model
  (SmolLM2-135M, float32, 2 CPU threads) on this machine; ``quire bench memory`` (real mode)
  refits and writes its own to the results JSON. The stored values and the run they came from
  are in docs/benchmarks.md.
* ``a100-opt13b``: the paper's setting, from a roofline rather than a measurement (no GPU
  here): c0 = reading 26 GB of fp16 weights at 1.555 TB/s (16.7 ms) + 2 ms of launches;
  c_token = 26 GFLOP per token at half of the A100's 312 TFLOP/s; c_context = 800 KB of fp16
  K/V per token (40 layers x 2 x 5120 x 2 bytes) at 1.555 TB/s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["PRESETS", "StepSample", "StepTimeModel", "fit"]


@dataclass(frozen=True)
class StepSample:
    """One measured step: its shape and how long it took."""

    batched_tokens: int
    attended_tokens: int
    seconds: float


@dataclass(frozen=True)
class StepTimeModel:
    name: str
    c0: float
    c_token: float
    c_context: float
    source: str = ""

    def seconds(self, batched_tokens: int, attended_tokens: int) -> float:
        return self.c0 + self.c_token * batched_tokens + self.c_context * attended_tokens

    def to_dict(self) -> dict:
        return asdict(self)


def fit(samples: Sequence[StepSample], name: str = "fitted", source: str = "") -> StepTimeModel:
    """Non-negative least squares over the three coefficients (a coefficient that would go negative is dropped)."""
    if len(samples) < 3:
        raise ValueError(f"need at least 3 steps to fit, got {len(samples)}")
    x = np.array([[1.0, s.batched_tokens, s.attended_tokens] for s in samples])
    y = np.array([s.seconds for s in samples])
    active = [0, 1, 2]
    coef = np.zeros(3)
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return StepTimeModel(name, float(coef[0]), float(coef[1]), float(coef[2]), source)


# Measured / derived as described in the module docstring and docs/benchmarks.md.
PRESETS: dict[str, StepTimeModel] = {
    "a100-opt13b": StepTimeModel(
        "a100-opt13b",
        c0=26e9 / 1.555e12 + 2e-3,
        c_token=26e9 / (0.5 * 312e12),
        c_context=800e3 / 1.555e12,
        source="roofline: OPT-13B fp16 on one A100-40GB (not measured)",
    ),
    "cpu-smollm2": StepTimeModel(
        "cpu-smollm2",
        c0=0.1124,
        c_token=0.009157,
        c_context=0.0005142,
        source="fit to 3,571 steps of `quire bench memory` (real), 2026-11-22, under load: other processes "
        "used 1.26 of 2 CPUs; refit on a quiet machine",
    ),
}
