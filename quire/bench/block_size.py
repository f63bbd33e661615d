"""``quire bench block-size``: the paper's Fig. 18b, end-to-end latency against the KV block size.

    quire bench block-size [--simulate] [--block-sizes 1,2,4,...,256] [--dataset alpaca,sharegpt]

The same trace is served with the paged allocator at each block size under the same KV
budget; reported per block size: mean normalized latency (s per output token, the paper's
y-axis), throughput, the time-averaged batch and the share of KV slots holding token states.
Small blocks cost kernel efficiency (more, shorter gathers); large blocks waste slots in each
sequence's last block, so fewer requests fit.

Real mode measures both effects on the real engine (a fresh engine per block size, built
with that block size and the same KV budget). ``--simulate`` runs the paper's setting with a
step-time model that does not depend on the block size, so it shows only the memory effect (large blocks).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from quire.bench.datasets import corpus_tokens, make_trace, word_token_stream
from quire.bench.memory import PAPER_RATES, load_step_model
from quire.bench.report import LoadMeter, Output, load_now, print_table, pyplot
from quire.bench.trace_runner import EngineExecutor, SimulatedExecutor, TraceRunResult, run_trace
from quire.config import SchedulerConfig
from quire.core.kv_cache_manager import KVCacheManager

__all__ = ["BlockSizeRun", "add_cli_args", "run"]


@dataclass
class BlockSizeRun:
    """One dataset's trace at every block size."""

    dataset: str
    request_rate: float
    num_requests: int
    block_sizes: list[int] = field(default_factory=list)
    results: list[TraceRunResult] = field(default_factory=list)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--simulate", action="store_true", help="the paper's scale, no model: modelled step times")
    parser.add_argument(
        "--block-sizes", default=None, help="comma-separated (default: simulated 1,2,4,...,256; real 1,4,16,64,256)"
    )
    parser.add_argument(
        "--dataset", default=None, help="comma-separated: sharegpt, alpaca (default: both simulated, alpaca real)"
    )
    parser.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="requests/s for every dataset; inf = all at once (default: simulated 2 ShareGPT / 30 Alpaca, real inf)",
    )
    parser.add_argument("--num-requests", type=int, default=None, help="per dataset (default: simulated 500, real 24)")
    parser.add_argument(
        "--kv-slots", type=int, default=None, help="KV budget in tokens (default: simulated 15,700, real 2,048)"
    )
    parser.add_argument("--max-model-len", type=int, default=None, help="default: simulated 2048, real 256")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: simulated 2560, real 512")
    parser.add_argument("--step-model", default="a100-opt13b", help="simulated step times (see quire bench memory)")
    parser.add_argument("--model", default=None, help="real mode: HF dir or .gguf (default: the embedded SmolLM2)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", default="bench-results")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    sim = args.simulate
    sizes = [int(b) for b in (args.block_sizes or ("1,2,4,8,16,32,64,128,256" if sim else "1,4,16,64,256")).split(",")]
    datasets = [
        d.strip().removesuffix("-like") for d in (args.dataset or ("sharegpt,alpaca" if sim else "alpaca")).split(",")
    ]
    num_requests = args.num_requests or (500 if sim else 24)
    kv_slots = args.kv_slots or (15_700 if sim else 2_048)
    max_model_len = args.max_model_len or (2048 if sim else 256)
    max_batched = args.max_num_batched_tokens or (2560 if sim else 512)
    config = SchedulerConfig(args.max_num_seqs, max_batched, max_model_len)
    out = Output(args.results_dir)
    machine = load_now()
    meter = LoadMeter()
    step_model = None
    if sim:
        step_model = load_step_model(args.step_model)
        tokens = word_token_stream()
    else:
        from quire.bench.engine_setup import load_engine, load_tokenizer, warm_up

        tokens = corpus_tokens(load_tokenizer(args.model))

    runs = []
    for dataset in datasets:
        rate = args.request_rate if args.request_rate is not None else (PAPER_RATES[dataset] if sim else math.inf)
        trace = make_trace(dataset, num_requests, tokens, rate, args.seed, max_total_len=max_model_len)
        block_run = BlockSizeRun(dataset, rate, len(trace))
        for block_size in sizes:
            slots = kv_slots // block_size * block_size
            if slots < max_model_len:
                out.console.print(f"skipping block size {block_size}: {slots} slots < max_model_len {max_model_len}")
                continue
            engine = None
            if sim:
                executor = SimulatedExecutor(KVCacheManager(slots // block_size, block_size), config, step_model)
            else:
                out.console.print(f"loading the model (block size {block_size}) ...")
                engine = load_engine(
                    args.model, slots, block_size, max_model_len, args.max_num_seqs, max_batched, args.dtype
                )
                warm_up(engine, tokens)
                executor = EngineExecutor(engine)
            label = f"{dataset} block {block_size}"
            with (
                meter.measure(),
                tqdm(
                    total=len(trace), desc=label, unit="req", leave=False, disable=True if args.no_progress else None
                ) as bar,
            ):
                result = run_trace(f"block-{block_size}", trace, executor, on_finish=bar.update)
            if engine is not None:
                engine.shutdown()
            block_run.block_sizes.append(block_size)
            block_run.results.append(result)
        runs.append(block_run)

    mode = "simulated" if sim else "real engine"
    for block_run in runs:
        rows = [
            [
                b,
                f"{r.mean_normalized_latency:.4f}",
                f"{r.request_throughput:.2f}",
                f"{r.output_throughput:.0f}",
                f"{r.mean_batched_requests:.1f}",
                f"{100 * r.shares.token_states:.1f}",
                f"{100 * r.shares.internal_frag:.1f}",
                r.num_preemptions,
            ]
            for b, r in zip(block_run.block_sizes, block_run.results, strict=True)
        ]
        print_table(
            f"Block size, {block_run.dataset}-like, {block_run.num_requests} requests at {block_run.request_rate:g} "
            f"req/s ({mode})",
            [
                "block size",
                "s/token",
                "req/s",
                "out tok/s",
                "avg batch",
                "token states %",
                "internal frag %",
                "preempt",
            ],
            rows,
            out.console,
        )
    payload = {
        "benchmark": "block-size",
        "mode": mode,
        "settings": {k: v for k, v in vars(args).items() if k != "func"}
        | {"kv_slots": kv_slots, "max_model_len": max_model_len, "max_num_batched_tokens": max_batched},
        "step_model": step_model.to_dict() if step_model else None,
        "machine": machine | {"other_cpus_during_runs": meter.other_cpus},
        "runs": runs,
    }
    out.write_json("block_size", payload)
    plot(runs, out, mode)
    return 0


def plot(runs: Sequence[BlockSizeRun], out: Output, mode: str) -> None:
    """Normalized latency against block size, one line per dataset (cf. paper Fig. 18b)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for block_run in runs:
        latencies = [r.mean_normalized_latency for r in block_run.results]
        ax.plot(block_run.block_sizes, latencies, marker="o", label=f"{block_run.dataset}-like")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block size (tokens)")
    ax.set_ylabel("normalized latency (s/token)")
    ax.set_title(f"End-to-end latency vs block size ({mode}; cf. paper Fig. 18b)", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    out.save_figure("block_size_fig18b", fig)
