"""``quire bench memory``: the paper's Fig. 2 (KV memory breakdown) and Fig. 13 (batch size).

    quire bench memory [--simulate] [--dataset sharegpt,alpaca] [--request-rate R] ...

One trace per dataset is served by the same scheduler under five KV allocators with the same
KV budget: Quire's paged allocator, Orca (Max / Pow2 / Oracle) contiguous reservations placed
first-fit, and FasterTransformer-like static batching (``quire.core.reservation_allocator``),
chosen like any engine setting (``EngineArgs.kv_allocator``). For each,
the time-averaged share of KV slots holding token states, reserved for future tokens, lost to
internal and to external fragmentation, or free; the time-averaged number of requests per
step; throughput and mean normalized latency (s per output token).

Real mode (default): the real engine and model (default SmolLM2-135M), a small budget so that
the reservations bind (2,048 slots, max_model_len 256: ~8 Max reservations, like the paper's
15.7K / 2,048), Alpaca-like requests all at once. ``--simulate``: the paper's setting (15.7K
slots, block 16, max_model_len 2,048, ShareGPT-like at 2 req/s and Alpaca-like at 30 req/s),
no model: step times from ``quire.bench.step_model`` (default: an OPT-13B / A100 roofline).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from quire.bench.datasets import TraceRequest, corpus_tokens, make_trace, word_token_stream
from quire.bench.report import LoadMeter, Output, load_now, print_table, pyplot
from quire.bench.step_model import PRESETS, StepTimeModel, fit
from quire.bench.trace_runner import EngineExecutor, SimulatedExecutor, TraceRunResult, run_trace
from quire.config import KV_ALLOCATORS, SchedulerConfig
from quire.core.allocator_registry import build_kv_allocator
from quire.core.reservation_allocator import static_batch_size

__all__ = ["ALLOCATORS", "MemoryRun", "add_cli_args", "run"]

ALLOCATORS = {
    "paged": "Quire (paged)",
    "orca-max": "Orca (Max)",
    "orca-pow2": "Orca (Pow2)",
    "orca-oracle": "Orca (Oracle)",
    "static": "Static (FT-like)",
}
assert tuple(ALLOCATORS) == KV_ALLOCATORS, "every engine allocator has a label here"
PAPER_RATES = {"sharegpt": 2.0, "alpaca": 30.0}
# The paper's figures for OPT-13B on ShareGPT (Fig. 2: share of KV memory holding token states;
# Fig. 13a: average batched requests at 2 req/s). Alpaca's bars are not transcribed here.
PAPER = {
    "sharegpt": {
        "token_states_pct": {"paged": 96.3, "orca-max": 20.4, "orca-pow2": 26.8, "orca-oracle": 38.2},
        "mean_batched_requests": {"paged": 30.42, "orca-max": 7.0, "orca-pow2": 9.81, "orca-oracle": 13.62},
    }
}
SHARE_KEYS = [
    ("token_states", "token states"),
    ("reserved", "reserved"),
    ("internal_frag", "internal frag."),
    ("external_frag", "external frag."),
    ("free", "free"),
]


@dataclass
class MemoryRun:
    """One trace served under every allocator."""

    dataset: str
    request_rate: float
    num_requests: int
    results: list[TraceRunResult] = field(default_factory=list)


def serve_trace(
    kind: str,
    trace: Sequence[TraceRequest],
    executor,
    static: int | None,
    progress: bool,
    label: str,
) -> TraceRunResult:
    with tqdm(total=len(trace), desc=label, unit="req", disable=None if progress else True, leave=False) as bar:
        return run_trace(kind, trace, executor, static_batch=static, on_finish=bar.update)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--simulate", action="store_true", help="the paper's scale, no model: modelled step times")
    parser.add_argument(
        "--dataset", default=None, help="comma-separated: sharegpt, alpaca (default: both simulated, alpaca real)"
    )
    parser.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="requests/s for every dataset; inf = all at once (default: simulated 2 ShareGPT / 30 "
        "Alpaca as the paper, real inf)",
    )
    parser.add_argument("--num-requests", type=int, default=None, help="per dataset (default: simulated 500, real 80)")
    parser.add_argument("--allocators", default=",".join(ALLOCATORS), help=f"comma-separated of {list(ALLOCATORS)}")
    parser.add_argument(
        "--kv-slots", type=int, default=None, help="KV budget in tokens (default: simulated 15,700, real 2,048)"
    )
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=None, help="default: simulated 2048, real 256")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: simulated 2560, real 512")
    parser.add_argument(
        "--step-model",
        default="a100-opt13b",
        help=f"simulated step times: one of {sorted(PRESETS)} or a JSON file with c0/c_token/c_context",
    )
    parser.add_argument("--model", default=None, help="real mode: HF dir or .gguf (default: the embedded SmolLM2)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", default="bench-results")
    parser.add_argument("--no-progress", action="store_true")


def load_step_model(spec: str) -> StepTimeModel:
    if spec in PRESETS:
        return PRESETS[spec]
    raw = json.loads(Path(spec).read_text())
    raw = raw.get("step_model_fit", raw)
    return StepTimeModel(raw.get("name", Path(spec).stem), raw["c0"], raw["c_token"], raw["c_context"], spec)


def _defaults(args: argparse.Namespace) -> None:
    sim = args.simulate
    if args.dataset is None:
        args.dataset = "sharegpt,alpaca" if sim else "alpaca"
    args.num_requests = args.num_requests or (500 if sim else 80)
    args.kv_slots = args.kv_slots or (15_700 if sim else 2_048)
    args.max_model_len = args.max_model_len or (2048 if sim else 256)
    args.max_num_batched_tokens = args.max_num_batched_tokens or (2560 if sim else 512)


def run(args: argparse.Namespace) -> int:
    _defaults(args)
    datasets = [d.strip().removesuffix("-like") for d in args.dataset.split(",") if d.strip()]
    kinds = [k.strip() for k in args.allocators.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ALLOCATORS]
    if unknown:
        raise ValueError(f"unknown allocators {unknown}; choose from {list(ALLOCATORS)}")
    kv_slots = args.kv_slots // args.block_size * args.block_size  # the same budget for every allocator
    out = Output(args.results_dir)
    progress = not args.no_progress
    machine = load_now()
    meter = LoadMeter()
    config = SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens, args.max_model_len)
    if args.simulate:
        step_model = load_step_model(args.step_model)
        tokens = word_token_stream()
        unit = 1  # the paper's baselines reserve token-granular contiguous chunks

        def executor_for(kind: str):
            block = args.block_size if kind == "paged" else unit
            allocator = build_kv_allocator(kind, kv_slots // block, block, args.max_model_len)
            return SimulatedExecutor(allocator, config, step_model), None

    else:
        from quire.bench.engine_setup import load_engine, load_tokenizer, warm_up

        tokens = corpus_tokens(load_tokenizer(args.model))
        unit = args.block_size  # a reservation is a run of consecutive blocks of the real KV tensor
        step_model = None

        def executor_for(kind: str):
            out.console.print(f"loading the model ({kind}) ...")
            engine = load_engine(
                args.model,
                kv_slots,
                args.block_size,
                args.max_model_len,
                args.max_num_seqs,
                args.max_num_batched_tokens,
                args.dtype,
                kv_allocator=kind,
            )
            warm_up(engine, tokens)
            return EngineExecutor(engine), engine

    runs = []
    for dataset in datasets:
        rate = (
            args.request_rate
            if args.request_rate is not None
            else (PAPER_RATES[dataset] if args.simulate else math.inf)
        )
        trace = make_trace(dataset, args.num_requests, tokens, rate, args.seed, max_total_len=args.max_model_len)
        memory_run = MemoryRun(dataset, rate, len(trace))
        for kind in kinds:
            executor, engine = executor_for(kind)
            static = static_batch_size(kv_slots // unit, unit, args.max_model_len) if kind == "static" else None
            with meter.measure():
                result = serve_trace(kind, trace, executor, static, progress, f"{dataset} {kind}")
            memory_run.results.append(result)
            if engine is not None:
                engine.shutdown()
        runs.append(memory_run)

    print_results(runs, out, args.simulate)
    fitted = None
    if not args.simulate:
        samples = [s for r in runs for res in r.results for s in res.steps]
        fitted = fit(samples, "cpu-fitted", f"least squares over {len(samples)} real steps")
        out.console.print(
            f"step-time fit (s): c0={fitted.c0:.4g} c_token={fitted.c_token:.4g} c_context={fitted.c_context:.4g}"
        )
    payload = {
        "benchmark": "memory",
        "mode": "simulated" if args.simulate else "real",
        "settings": {k: v for k, v in vars(args).items() if k != "func"} | {"kv_slots": kv_slots, "unit": unit},
        "step_model": step_model.to_dict() if step_model else None,
        "step_model_fit": fitted.to_dict() if fitted else None,
        "machine": machine | {"other_cpus_during_runs": meter.other_cpus},
        "paper": PAPER,
        "runs": runs,
    }
    out.write_json("memory", payload)
    plot_fig2(runs, out)
    plot_fig13(runs, out)
    return 0


def print_results(runs: Sequence[MemoryRun], out: Output, simulated: bool) -> None:
    mode = "simulated" if simulated else "real engine"
    for memory_run in runs:
        paper = PAPER.get(memory_run.dataset, {})
        rows = []
        for r in memory_run.results:
            s = r.shares
            paper_tokens = paper.get("token_states_pct", {}).get(r.allocator)
            paper_batch = paper.get("mean_batched_requests", {}).get(r.allocator)
            rows.append(
                [
                    ALLOCATORS[r.allocator],
                    *(f"{100 * getattr(s, key):.1f}" for key, _ in SHARE_KEYS),
                    f"{r.mean_batched_requests:.1f}",
                    f"{r.request_throughput:.2f}",
                    f"{r.output_throughput:.0f}",
                    f"{r.mean_normalized_latency:.3f}",
                    r.num_preemptions,
                    f"{paper_tokens:.1f}" if paper_tokens is not None else None,
                    f"{paper_batch:.1f}" if paper_batch is not None else None,
                ]
            )
        title = (
            f"KV memory, {memory_run.dataset}-like, {memory_run.num_requests} requests at "
            f"{memory_run.request_rate:g} req/s ({mode}; shares in % of {memory_run.results[0].kv_slots} slots)"
        )
        columns = [
            "allocator",
            *(f"{label} %" for _, label in SHARE_KEYS),
            "avg batch",
            "req/s",
            "out tok/s",
            "s/token",
            "preempt",
            "paper tok %",
            "paper batch",
        ]
        print_table(title, columns, rows, out.console)


def _run_title(memory_run: MemoryRun) -> str:
    rate = "all at once" if math.isinf(memory_run.request_rate) else f"{memory_run.request_rate:g} req/s"
    return f"{memory_run.dataset}-like, {rate}"


def plot_fig2(runs: Sequence[MemoryRun], out: Output) -> None:
    """Stacked bars per allocator, like the paper's Fig. 2 (one panel per trace)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 4), squeeze=False)
    colors = ["#4c72b0", "#8fb0d8", "#dd8452", "#c44e52", "#dddddd"]
    for ax, memory_run in zip(axes[0], runs, strict=True):
        names = [ALLOCATORS[r.allocator].replace(" (", "\n(") for r in memory_run.results]
        bottom = [0.0] * len(names)
        for (key, label), color in zip(SHARE_KEYS, colors, strict=True):
            values = [100 * getattr(r.shares, key) for r in memory_run.results]
            ax.bar(names, values, bottom=bottom, label=label, color=color, edgecolor="black", linewidth=0.4)
            for i, value in enumerate(values):
                if key == "token_states":
                    ax.text(i, value / 2, f"{value:.1f}", ha="center", va="center", fontsize=8, color="white")
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_ylim(0, 100)
        ax.set_ylabel("KV cache memory (%)")
        ax.set_title(_run_title(memory_run), fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("KV memory usage by allocator (cf. paper Fig. 2)")
    out.save_figure("memory_fig2", fig)


def plot_fig13(runs: Sequence[MemoryRun], out: Output) -> None:
    """Bars of the time-averaged batch size per allocator, like the paper's Fig. 13 (a, b)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 3.6), squeeze=False)
    for panel, (ax, memory_run) in enumerate(zip(axes[0], runs, strict=True)):
        names = [ALLOCATORS[r.allocator].replace(" (", "\n(") for r in memory_run.results]
        values = [r.mean_batched_requests for r in memory_run.results]
        bars = ax.bar(names, values, color="#4c72b0", edgecolor="black", linewidth=0.4)
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=8)
        ax.set_ylabel("# batched requests")
        ax.set_title(f"({chr(ord('a') + panel)}) {_run_title(memory_run)}", fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        ax.margins(y=0.15)
    fig.suptitle("Average number of batched requests (cf. paper Fig. 13)")
    out.save_figure("memory_fig13", fig)
