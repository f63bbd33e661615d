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
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass

from quire.bench.report import LoadMeter, Output, load_now, print_table, pyplot

__all__ = ["KernelPoint", "add_cli_args", "measure", "run"]

_DTYPES = ("float32", "bfloat16")


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


def measure(batch_size: int, context_len: int, dtype: str, min_time: float) -> KernelPoint:
    import torch
    import torch.nn.functional as F

    from quire.attention.reference import paged_attention_reference
    from quire.bench.attention_kernel import make_case, time_call
    from quire.kernels import cpu_kernel

    torch_dtype = getattr(torch, dtype)
    case = make_case(f"b{batch_size} ctx{context_len}", [1] * batch_size, [context_len] * batch_size, torch_dtype)
    # The same K/V, laid out contiguously per sequence as a non-paged system keeps it.
    tables = case.block_tables.long()
    k = case.key_cache[tables].flatten(1, 2)[:, :context_len].transpose(1, 2).contiguous()
    v = case.value_cache[tables].flatten(1, 2)[:, :context_len].transpose(1, 2).contiguous()
    q = case.query.unsqueeze(2)  # [batch, heads, 1, head_dim]

    def contiguous():
        return F.scaled_dot_product_attention(q, k, v, scale=case.scale, enable_gqa=True).squeeze(2)

    if cpu_kernel.is_available():
        out = torch.empty_like(case.query)

        def paged():
            return cpu_kernel.paged_attention(*case.args, out=out)
    else:

        def paged():
            return paged_attention_reference(*case.args)

    # The same K/V with sequence s's blocks at s * n .. s * n + n - 1, in order.
    ordered_tables = torch.arange(tables.numel(), dtype=torch.int32).view_as(case.block_tables)
    ordered_args = (
        case.query,
        case.key_cache[tables.flatten()],
        case.value_cache[tables.flatten()],
        ordered_tables,
        *case.args[4:],
    )
    if cpu_kernel.is_available():
        ordered_out = torch.empty_like(case.query)

        def in_order():
            return cpu_kernel.paged_attention(*ordered_args, out=ordered_out)
    else:

        def in_order():
            return paged_attention_reference(*ordered_args)

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
                points.append(measure(batch_size, context_len, args.dtype, args.min_time))
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
