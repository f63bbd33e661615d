"""Which product path serves which row count, measured on the machine that runs.

A step's batch ranges from one decode row to hundreds of prefill rows, and which of Quire's
product paths is fastest at a row count depends on the CPU (vector width, AMX, memory bandwidth,
cores), not on the model. So the crossovers are not tables: on first use a short calibration times
every path on a synthetic layer at a ladder of row counts and keeps, for each dtype, up to how
many rows each path wins. The result is cached on disk (``cache_dir()/calibration.json``), keyed
by the CPU's flags, the core and thread counts, the ISA level and a hash of the kernels' sources,
so later processes on the same machine start without measuring (``kernels/calibration_cache.py``).

The paths (``models/linear.py``):

* ``quant``: the block-format product (``quant_linear``) on GGUF weights;
* ``small``: ``small_linear`` on float weights, for a few rows;
* ``packed``: oneDNN with the weight reordered once into its blocked layout;
* ``dense``: PyTorch's ``F.linear``.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from quire.kernels.calibration_cache import cached_measurement

logger = logging.getLogger(__name__)

ROW_LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # row counts timed; between two, the lower one's winner
SMALL_LADDER_TOP = 8  # small_linear is timed only up to here
# The synthetic layer: K x N like a model's projections, four copies so the weights a round reads
# (16 MB in float32) are not all cache-resident, as a model's are not.
CAL_K, CAL_N, CAL_COPIES = 1024, 1024, 4
CAL_REPEATS = 3  # timed rounds per (path, rows) after one warm-up round; the fastest counts


@dataclass(frozen=True)
class LinearPlan:
    """Up to how many rows each path serves, for one dtype on this machine.

    ``quant_rows`` and ``small_rows`` are inclusive limits (``sys.maxsize``: every row count);
    ``packed_from``..``packed_to`` is the inclusive range where oneDNN's reordered weight beats
    ``F.linear`` (empty when ``packed_from > packed_to``).
    """

    quant_rows: int
    small_rows: int
    packed_from: int
    packed_to: int
    seconds: float = 0.0  # how long the measurement took

    def packed_range(self) -> range:
        return range(self.packed_from, self.packed_to + 1)

    def describe(self) -> str:
        def limit(n: int) -> str:
            return "every row count" if n == sys.maxsize else f"<= {n} rows"

        packed = f"{self.packed_from}-{self.packed_to} rows" if self.packed_from <= self.packed_to else "never"
        return (
            f"GGUF block path {limit(self.quant_rows)}; small_linear {limit(self.small_rows)}; "
            f"oneDNN packed {packed}; F.linear otherwise"
        )


def onednn_available(dtype: torch.dtype) -> bool:
    """Whether oneDNN can run a reordered-weight product in ``dtype`` on this CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def linear_plan(kernels, dtype: torch.dtype) -> LinearPlan:
    """The row limits of each product path for ``dtype``: cached, or measured now (a fraction of a second).

    Args:
        kernels: the compiled op namespace (``cpu_kernel.fused_ops()``); None means only PyTorch's paths.
        dtype: the layer dtype, ``torch.float32`` or ``torch.bfloat16``.

    Returns:
        The plan; without kernels or for another dtype, one where only ``F.linear`` (and oneDNN) serve.
    """
    if kernels is None or dtype not in (torch.float32, torch.bfloat16):
        return LinearPlan(quant_rows=0, small_rows=0, packed_from=1, packed_to=0)
    from quire.kernels import cpu_kernel

    params = [cpu_kernel.level_of(kernels), cpu_kernel.source_tag(), str(dtype), ROW_LADDER, CAL_K, CAL_N]
    entry, measured = cached_measurement("linear", params, lambda: asdict(_measure(kernels, dtype)))
    plan = LinearPlan(**entry)
    if measured:
        logger.info("calibrated the linear paths (%s, %.2f s): %s", dtype, plan.seconds, plan.describe())
    return plan


def _measure(kernels, dtype: torch.dtype) -> LinearPlan:
    from quire.models.block_format import pack_quantized

    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    # Random Q4_1 blocks (fp16 d, m then 16 bytes of nibbles) give the block path its real work.
    blocks = torch.randint(0, 256, (CAL_COPIES, CAL_N, CAL_K // 32, 20), dtype=torch.uint8, generator=gen)
    blocks[..., 0:4] = torch.tensor([0x00, 0x20, 0x00, 0xA0], dtype=torch.uint8)  # d = 2^-7, m = -2^-7
    packed_q = [pack_quantized(b.reshape(CAL_N, -1), "q4_1") for b in blocks]
    weights = [torch.randn(CAL_N, CAL_K, generator=gen).to(dtype) for _ in range(CAL_COPIES)]
    onednn = onednn_available(dtype)
    reordered = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights] if onednn else []

    def run_quant(x, i):
        return kernels.quant_linear(x, packed_q[i], 0, CAL_N)

    def run_small(x, i):
        out = x.new_empty(x.shape[0], CAL_N)
        kernels.small_linear(x, weights[i], out)
        return out

    def run_packed(x, i):
        return torch.ops.mkldnn._linear_pointwise(x, reordered[i], None, "none", [], "")

    def run_dense(x, i):
        return F.linear(x, weights[i])

    paths = {"quant": run_quant, "small": run_small, "dense": run_dense}
    if onednn:
        paths["packed"] = run_packed
    best: dict[int, dict[str, float]] = {}
    float_paths = [p for p in ("small", "packed", "dense") if p in paths]
    for rows in ROW_LADDER:
        x = torch.randn(rows, CAL_K, generator=gen).to(dtype)
        timed = {name: fn for name, fn in paths.items() if name != "small" or rows <= SMALL_LADDER_TOP}
        best[rows] = _time_alternating(timed, x)
        # A path's limit is the rung before its first loss: past that it need not be timed (the
        # slow scalar level would spend seconds on it).
        for path, rivals in (("quant", ["quant", "packed", "dense"]), ("small", float_paths)):
            if path in paths and not _wins(best[rows], path, rivals):
                del paths[path]
    plan = LinearPlan(
        # small_linear is no rival of the block path: it streams 16-32 bits a weight where the block
        # path reads 5-8.5, an edge the cache-resident synthetic layer does not show.
        quant_rows=_last_win(best, "quant", ["quant", "packed", "dense"]),
        small_rows=_last_win(best, "small", float_paths),
        packed_from=next((r for r in ROW_LADDER if _wins(best[r], "packed", ["packed", "dense"])), 1),
        packed_to=max((r for r in ROW_LADDER if _wins(best[r], "packed", ["packed", "dense"])), default=0),
        seconds=time.perf_counter() - start,
    )
    if plan.packed_to == ROW_LADDER[-1]:  # still ahead at the top of the ladder: keep it for twice that
        plan = LinearPlan(plan.quant_rows, plan.small_rows, plan.packed_from, 2 * ROW_LADDER[-1], plan.seconds)
    return plan


def _time_alternating(paths: dict, x: torch.Tensor) -> dict[str, float]:
    """The fastest round of each path, the paths taking turns so that a busy moment of the machine
    slows all of them rather than deciding between them."""
    for fn in paths.values():
        for i in range(CAL_COPIES):  # warm-up: first touch, oneDNN's primitive cache
            fn(x, i)
    fastest = dict.fromkeys(paths, float("inf"))
    for _ in range(CAL_REPEATS):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            for i in range(CAL_COPIES):
                fn(x, i)
            fastest[name] = min(fastest[name], time.perf_counter() - t0)
    return fastest


def _wins(times: dict[str, float], path: str, rivals: list[str]) -> bool:
    present = [times[p] for p in rivals if p in times]
    return path in times and times[path] <= min(present)


def _last_win(best: dict[int, dict[str, float]], path: str, rivals: list[str]) -> int:
    """The largest ladder row count up to which ``path`` wins at every rung (``sys.maxsize`` if at all)."""
    last = 0
    for rows in ROW_LADDER:
        if not _wins(best[rows], path, rivals):
            return last
        last = rows
    return sys.maxsize if path == "quant" else last
