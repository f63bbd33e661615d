"""``quire bench {throughput,memory,sharing,kernel,block-size,swap,serve}``: one command per paper comparison.

Every subcommand prints a table, and writes ``<name>.json`` and PNG figures into
``--results-dir`` (default ``bench-results/``). The benchmarks live in their own modules; the
adapters here only turn the older ones' results (throughput, sharing, serve) into the same
table / JSON / figure outputs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_bench_commands"]


def add_bench_commands(bench: argparse.ArgumentParser) -> None:
    from quire.bench import block_size, kernel_sweep, memory
    from quire.bench import serve as serve_bench
    from quire.bench import sharing as sharing_bench
    from quire.bench import swap as swap_bench
    from quire.bench import throughput as throughput_bench

    commands = bench.add_subparsers(dest="bench_command", required=True)

    throughput = commands.add_parser(
        "throughput", help="offline throughput: Quire vs transformers generate (static batches)"
    )
    throughput_bench.add_cli_args(throughput)
    throughput.add_argument("--results-dir", default="bench-results")
    throughput.set_defaults(func=lambda args: _throughput(args, throughput))

    mem = commands.add_parser("memory", help="KV memory breakdown and batch size per allocator (Fig. 2, Fig. 13)")
    memory.add_cli_args(mem)
    mem.set_defaults(func=memory.run)

    sharing = commands.add_parser("sharing", help="memory saved by parallel sampling / beam search (Fig. 15)")
    sharing_bench.add_cli_args(sharing)
    sharing.add_argument("--results-dir", default="bench-results")
    sharing.set_defaults(func=_sharing)

    kernel = commands.add_parser("kernel", help="paged vs contiguous decode attention (Fig. 18a)")
    kernel_sweep.add_cli_args(kernel)
    kernel.set_defaults(func=kernel_sweep.run)

    blocks = commands.add_parser("block-size", help="end-to-end latency vs KV block size (Fig. 18b)")
    block_size.add_cli_args(blocks)
    blocks.set_defaults(func=block_size.run)

    swap = commands.add_parser("swap", help="swap vs recompute cost of a preempted sequence (Fig. 19)")
    swap_bench.add_cli_args(swap)
    swap.set_defaults(func=swap_bench.run)

    serve = commands.add_parser("serve", help="load-test an OpenAI-compatible server")
    serve_bench.add_cli_args(serve)
    serve.add_argument("--results-dir", default="bench-results")
    serve.set_defaults(func=_serve)


def _throughput(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import dataclasses

    from quire.bench import throughput
    from quire.bench.report import Output, print_table, pyplot

    out = Output(args.results_dir)
    path = out.dir / "throughput.json"
    cfg = dataclasses.replace(throughput.config_from_args(args, parser), json_path=str(path))
    code = throughput.run(cfg)
    if not path.exists() or cfg.speculative is not None:  # the A/B printed its own table
        return code or (0 if path.exists() else 1)
    report = json.loads(path.read_text())
    num_requests = report["workload"]["num_requests"]
    rows, labels, values = [], [], []
    several = len({r.get("round", 0) for r in report["results"]}) > 1
    for r in report["results"]:
        wall = r.get("wall_s")
        rows.append(
            [
                r["engine"],
                r["dtype"],
                r.get("round", 0) + 1,
                f"{num_requests / wall:.2f}" if wall else None,
                _fixed(r.get("total_tok_s"), 1),
                _fixed(r.get("useful_output_tok_s"), 1),
                _fixed(r.get("single_stream_ms_per_token"), 1),
                _fixed(wall, 1),
            ]
        )
        if r.get("useful_output_tok_s"):
            labels.append(f"{r['engine']}\n{r['dtype']}" + (f"\nround {r['round'] + 1}" if several else ""))
            values.append(r["useful_output_tok_s"])
    print_table(
        f"Offline throughput, {num_requests} requests (same prompts, model, machine)",
        ["engine", "dtype", "round", "req/s", "total tok/s", "output tok/s", "ms/token (1 stream)", "wall s"],
        rows,
        out.console,
    )
    if values:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(values)), 3.5))
        bars = ax.bar(labels, values, color="#4c72b0", edgecolor="black", linewidth=0.4)
        ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=8)
        ax.set_ylabel("output tokens/s")
        ax.set_title("Offline throughput (useful output tokens/s)", fontsize=10)
        ax.margins(y=0.15)
        out.save_figure("throughput", fig)
    return code


def _fixed(value: float | None, digits: int) -> str | None:
    return None if value is None else f"{value:.{digits}f}"


def _sharing(args: argparse.Namespace) -> int:
    from quire.bench.report import Output, load_now, print_table, pyplot
    from quire.bench.sharing import PAPER_ALPACA, measure

    out = Output(args.results_dir)
    machine = load_now()
    results = measure(args)
    rows = []
    for kind, label in (("parallel", "n"), ("beam", "width")):
        for key, value in results[kind].items():
            dataset, setting = key.split(" ")
            k = int(setting.split("=")[1])
            paper = PAPER_ALPACA[kind][k] if dataset == "alpaca-like" else None
            rows.append([kind, dataset, f"{label}={k}", f"{value:.1f}", f"{paper:.1f}" if paper is not None else None])
    print_table(
        "KV blocks saved by sharing / blocks needed without sharing (%)",
        ["decoding", "dataset", "setting", "saved %", "paper % (Alpaca, OPT-13B)"],
        rows,
        out.console,
    )
    if results["prefix"]:
        print_table(
            "Prefix cache",
            ["prefix", "computed (cache on)", "computed (off)", "prefill saved %", "s on", "s off", "speed-up"],
            [
                [
                    key,
                    r["computed_on"],
                    r["computed_off"],
                    r["prefill_saved_pct"],
                    r["seconds_on"],
                    r["seconds_off"],
                    r["throughput_gain"],
                ]
                for key, r in results["prefix"].items()
            ],
            out.console,
        )
    out.write_json(
        "sharing",
        {
            "benchmark": "sharing",
            "settings": _settings(args),
            "machine": machine,
            "paper_alpaca": PAPER_ALPACA,
            "results": results,
        },
    )
    plt = pyplot()
    kinds = [k for k in ("parallel", "beam") if results[k]]
    if kinds:
        fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.5), squeeze=False)
        for ax, kind in zip(axes[0], kinds, strict=True):
            for offset, dataset in ((-0.2, "alpaca-like"), (0.2, "sharegpt-like")):
                items = [(key.split("=")[1], v) for key, v in results[kind].items() if key.startswith(dataset)]
                xs = [i + offset for i in range(len(items))]
                bars = ax.bar(xs, [v for _, v in items], width=0.4, label=dataset, edgecolor="black", linewidth=0.4)
                ax.bar_label(bars, labels=[f"{v:.1f}" for _, v in items], fontsize=7)
                ax.set_xticks(range(len(items)), [k for k, _ in items])
            ax.set_xlabel("# output sequences" if kind == "parallel" else "beam width")
            ax.set_ylabel("memory saving (%)")
            ax.set_title("parallel sampling" if kind == "parallel" else "beam search", fontsize=10)
            ax.legend(fontsize=8)
            ax.margins(y=0.15)
        fig.suptitle("KV memory saved by sharing (cf. paper Fig. 15)")
        out.save_figure("sharing_fig15", fig)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from quire.bench import serve
    from quire.bench.report import Output, print_table, pyplot

    out = Output(args.results_dir)
    path = Path(args.result_json) if args.result_json else out.dir / "serve.json"
    args.result_json = str(path)
    code = serve.run(args)
    if not path.exists():
        return code
    s = json.loads(path.read_text())
    names = [("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E")]
    print_table(
        "Serving latency (ms)",
        ["metric", "mean", "median", "p99"],
        [[label, *(f"{s[f'{stat}_{name}_ms']:.1f}" for stat in ("mean", "median", "p99"))] for name, label in names],
        out.console,
    )
    plt = pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(12, 3.2))
    for ax, (name, label) in zip(axes, names, strict=True):
        values = [s[f"{stat}_{name}_ms"] for stat in ("mean", "median", "p99")]
        bars = ax.bar(["mean", "median", "p99"], values, color="#4c72b0", edgecolor="black", linewidth=0.4)
        ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=7)
        ax.set_title(f"{label} (ms)", fontsize=10)
        ax.margins(y=0.15)
    fig.suptitle(f"Serving: {s['dataset']}, {s['request_rate']} req/s, {s['completed']} requests")
    out.save_figure("serve", fig)
    return code


def _settings(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"}
