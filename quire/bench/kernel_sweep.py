"""``quire bench kernel``: the paper's Fig. 18a, paged attention against attention on contiguous K/V.

    quire bench kernel [--batch-sizes 1,8,32,64] [--context-lens 64,128,256,512,1024,2048] [--dtype float32]

Decode (one query token per sequence, every sequence with the same context). The paged side is
Quire's CPU kernel reading K/V through shuffled block tables (block size 16); the contiguous
side is what a system without paging runs: one PyTorch SDPA call over a ``[batch, kv_heads,
context, head_dim]`` K/V tensor. Overhead % = paged / contiguous - 1 (the paper reports 20-26 %
for its CUDA kernel against FasterTransformer's), from the *fastest* call of each: on a shared
2-core machine a descheduled OpenMP thread stalls a call by a whole time slice (~12 ms here),
which swamps medians of sub-millisecond calls; the medians are reported too. A third timing,
"in-order", runs the same paged kernel with each sequence's blocks adjacent and in order: against
it, the shuffled run isolates the cost of the indirection itself (SDPA is a different kernel).
Heads and head_dim are the default model's (9 query / 3 KV heads, 64).

``--backend triton`` times the Triton decode kernel instead, on CUDA when there is a GPU (the
figure the paper's comparison needs); without one it runs in Triton's interpreter
(``TRITON_INTERPRET=1``), which checks the command and the kernel's results but times nothing
meaningful.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass

from quire.bench.report import LoadMeter, Output, load_now, print_table, pyplot

__all__ = ["KernelPoint", "add_cli_args", "measure", "run"]

_DTYPES = ("float32", "bfloat16")
BACKENDS = ("cpu", "triton")


@dataclass(frozen=True)
class KernelPoint:
    batch_size: int
    context_len: int
    paged_ms: float  # fastest call
    contiguous_ms: float
    paged_median_ms: float
    contiguous_median_ms: float
    in_order_ms: float  # the paged kernel, blocks laid out contiguously and in order (fastest call)
    max_abs_diff: float  # paged vs contiguous outputs: both must compute the same attention

    @property
    def overhead_pct(self) -> float:
        return 100 * (self.paged_ms / self.contiguous_ms - 1)

    @property
    def indirection_pct(self) -> float:
        return 100 * (self.paged_ms / self.in_order_ms - 1)


def _triton_device():
    """Where the Triton kernels run: the GPU, or the CPU under the interpreter (refused without it)."""
    import os

    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--backend triton without a GPU needs TRITON_INTERPRET=1 (Triton's interpreter)")
    return torch.device("cpu")


def _paged_call(backend: str, args: tuple, out):
    """One paged-attention call on ``args`` (a ``make_case`` argument tuple) by ``backend``."""
    from quire.attention.reference import paged_attention_reference
    from quire.kernels import cpu_kernel

    if backend == "triton":
        from quire.kernels import triton_attention

        return lambda: triton_attention.paged_decode(*args, out=out)
    if cpu_kernel.is_available():
        return lambda: cpu_kernel.paged_attention(*args, out=out)
    return lambda: paged_attention_reference(*args)


def _synchronized(call, device):
    """``call`` followed by a device sync, so a timer around it measures the kernel, not the launch."""
    import torch

    if device.type != "cuda":
        return call

    def run():
        result = call()
        torch.cuda.synchronize()
        return result

    return run


def measure(batch_size: int, context_len: int, dtype: str, min_time: float, backend: str = "cpu") -> KernelPoint:
    import torch
    import torch.nn.functional as F

    from quire.bench.attention_kernel import make_case, time_call

    torch_dtype = getattr(torch, dtype)
    device = _triton_device() if backend == "triton" else torch.device("cpu")
    case = make_case(f"b{batch_size} ctx{context_len}", [1] * batch_size, [context_len] * batch_size, torch_dtype)
    on_device = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in case.args)
    # The same K/V, laid out contiguously per sequence as a non-paged system keeps it.
    tables = on_device[3].long()
    k = on_device[1][tables].flatten(1, 2)[:, :context_len].transpose(1, 2).contiguous()
    v = on_device[2][tables].flatten(1, 2)[:, :context_len].transpose(1, 2).contiguous()
    q = on_device[0].unsqueeze(2)  # [batch, heads, 1, head_dim]

    def contiguous_call():
        return F.scaled_dot_product_attention(q, k, v, scale=case.scale, enable_gqa=True).squeeze(2)

    contiguous = _synchronized(contiguous_call, device)
    paged = _synchronized(_paged_call(backend, on_device, torch.empty_like(on_device[0])), device)
    # The same K/V with sequence s's blocks at s * n .. s * n + n - 1, in order.
    ordered_tables = torch.arange(tables.numel(), dtype=torch.int32, device=device).view_as(on_device[3])
    ordered_args = (
        on_device[0],
        on_device[1][tables.flatten()],
        on_device[2][tables.flatten()],
        ordered_tables,
        *on_device[4:],
    )
    in_order = _synchronized(_paged_call(backend, ordered_args, torch.empty_like(on_device[0])), device)

    paged_median, paged_best = time_call(paged, min_time)
    contiguous_median, contiguous_best = time_call(contiguous, min_time)
    _, in_order_best = time_call(in_order, min_time)
    diff = max(
        (paged().float() - contiguous().float()).abs().max().item(),
        (in_order().float() - contiguous().float()).abs().max().item(),
    )
    times = (paged_best, contiguous_best, paged_median, contiguous_median, in_order_best)
    return KernelPoint(batch_size, context_len, *(1e3 * t for t in times), diff)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--context-lens", default="64,128,256,512,1024,2048")
    parser.add_argument("--dtype", default="float32", choices=_DTYPES)
    parser.add_argument(
        "--backend", default="cpu", choices=BACKENDS, help="paged kernel: the compiled CPU one, or Triton's"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    parser.add_argument("--results-dir", default="bench-results")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from quire.bench.attention_kernel import HEAD_DIM, NUM_KV_HEADS, NUM_Q_HEADS
    from quire.kernels import cpu_kernel

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    contexts = [int(c) for c in args.context_lens.split(",")]
    out = Output(args.results_dir)
    machine = load_now()
    meter = LoadMeter()
    start = time.perf_counter()
    kernel = cpu_kernel.is_available()
    build_s = time.perf_counter() - start
    points = []
    grid = [(b, c) for b in batches for c in contexts]
    with tqdm(grid, desc="kernel", unit="case", leave=False, disable=True if args.no_progress else None) as bar:
        for batch_size, context_len in bar:
            with meter.measure():
                points.append(measure(batch_size, context_len, args.dtype, args.min_time, args.backend))
    rows = [
        [
            p.batch_size,
            p.context_len,
            f"{p.paged_ms:.3f}",
            f"{p.contiguous_ms:.3f}",
            f"{p.overhead_pct:+.0f}",
            f"{p.in_order_ms:.3f}",
            f"{p.indirection_pct:+.0f}",
            f"{p.paged_median_ms:.3f}",
            f"{p.contiguous_median_ms:.3f}",
            f"{p.max_abs_diff:.1e}",
        ]
        for p in points
    ]
    if args.backend == "triton":
        impl = f"Triton kernel on {_triton_device()}"
    else:
        impl = "compiled kernel" if kernel else "pure-PyTorch reference (kernel unavailable)"
    print_table(
        f"Decode attention, paged ({impl}) vs contiguous SDPA, {args.dtype}, {args.threads} threads",
        [
            "batch",
            "context",
            "paged ms",
            "SDPA ms",
            "vs SDPA %",
            "in-order ms",
            "vs in-order %",
            "paged median",
            "SDPA median",
            "max |diff|",
        ],
        rows,
        out.console,
    )
    out.write_json(
        "kernel",
        {
            "benchmark": "kernel",
            "settings": {k: v for k, v in vars(args).items() if k != "func"},
            "paged_impl": impl,
            "kernel_load_s": build_s,
            "heads": {"query": NUM_Q_HEADS, "kv": NUM_KV_HEADS, "head_dim": HEAD_DIM, "block_size": 16},
            "machine": machine | {"other_cpus_during_runs": meter.other_cpus},
            "points": [
                p.__dict__ | {"overhead_pct": p.overhead_pct, "indirection_pct": p.indirection_pct} for p in points
            ],
        },
    )
    plot(points, out, args.dtype)
    return 0


def plot(points: Sequence[KernelPoint], out: Output, dtype: str) -> None:
    """Latency against context length, paged (solid) and contiguous (dashed), per batch size (cf. Fig. 18a)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    batches = sorted({p.batch_size for p in points})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, batch in enumerate(batches):
        series = sorted((p for p in points if p.batch_size == batch), key=lambda p: p.context_len)
        xs = [p.context_len for p in series]
        color = colors[i % len(colors)]
        ax.plot(xs, [p.paged_ms for p in series], marker="o", color=color, label=f"paged, batch {batch}")
        ax.plot(
            xs,
            [p.contiguous_ms for p in series],
            marker="s",
            linestyle="--",
            color=color,
            label=f"SDPA contiguous, batch {batch}",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("attention latency (ms)")
    ax.set_title(f"Decode attention kernel, {dtype} (cf. paper Fig. 18a)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    out.save_figure("kernel_fig18a", fig)
