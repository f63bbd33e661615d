"""Swap vs recompute (the paper's Fig. 19): what preempting one sequence costs each way, on this machine.

Swap: the real ``KVCacheManager.swap_out`` + ``swap_in`` bookkeeping and the real ``CacheEngine``
copies (device -> host -> device, one indexed copy over all layers each way) for a sequence of
``context`` tokens, on a cache of the engine's shape (``LLMEngine.model_info``) built for the
measurement, so the engine's own cache is never touched. Recompute: the real engine prefilling
those ``context`` tokens again in one step (what a recomputed request costs when it is
readmitted). Both are timed for every block size and context length; the crossover is the
shortest context at which recompute costs more than swapping, which ``preemption_mode="auto"``
uses (``SchedulerConfig.swap_min_tokens``).

    quire bench swap [--block-sizes 1 2 4 ...] [--contexts 16 32 ...] [--results-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass

DEFAULT_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_CONTEXTS = (16, 32, 64, 128, 256, 512, 1024, 2048)
# Recompute does not depend much on the block size (only the attention reads go through it), and
# a 2048-token prefill takes seconds here, so recompute is timed at every context for this block
# size and at every block size for these contexts.
RECOMPUTE_BLOCK_SIZE = 16
RECOMPUTE_CONTEXTS_ALL_BLOCK_SIZES = (256,)


@dataclass
class SwapPoint:
    block_size: int
    context: int
    num_blocks: int
    swap_out_ms: float
    swap_in_ms: float
    recompute_ms: float | None

    @property
    def swap_ms(self) -> float:
        return self.swap_out_ms + self.swap_in_ms


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _time_swap(kv, cache, context: int, repeats: int) -> tuple[float, float]:
    """Median ms to swap a ``context``-token sequence out, and back in (bookkeeping and copies)."""
    seq_id = -1
    kv.allocate_slots(seq_id, 0, context)
    outs, ins = [], []
    for _ in range(repeats + 1):  # the first round warms up
        start = time.perf_counter()
        cache.swap_out(kv.swap_out([seq_id]))
        cache.wait_for_copies()
        mid = time.perf_counter()
        cache.swap_in(kv.swap_in([seq_id]))
        cache.wait_for_copies()
        outs.append((mid - start) * 1e3)
        ins.append((time.perf_counter() - mid) * 1e3)
    kv.free(seq_id)
    return statistics.median(outs[1:]), statistics.median(ins[1:])


def _time_recompute(llm, token_ids: list[int], repeats: int) -> float:
    """Median ms for the engine to prefill ``token_ids`` in one step (and sample one token)."""
    from quire import SamplingParams

    prompt = {"prompt_token_ids": token_ids}
    params = SamplingParams(max_tokens=1, temperature=0)
    return _median_ms(lambda: llm.generate([prompt], params, use_tqdm=False), repeats)


def measure(
    model: str | None,
    block_sizes: tuple[int, ...],
    contexts: tuple[int, ...],
    repeats: int = 5,
    dtype: str = "float32",
) -> list[SwapPoint]:
    import torch

    from quire import LLM
    from quire.core.kv_cache_manager import KVCacheManager
    from quire.worker.cache_engine import CacheEngine

    points = []
    corpus = list(range(1000, 1000 + max(contexts)))
    for block_size in block_sizes:
        longest = max(contexts)
        num_blocks = -(-longest // block_size) + 2
        llm = LLM(
            model,
            dtype=dtype,
            block_size=block_size,
            num_kv_blocks=num_blocks,
            num_host_kv_blocks=num_blocks,
            max_num_batched_tokens=longest,
            enable_prefix_caching=False,
        )
        info = llm.engine.model_info()
        # The same shape as the engine's pools; back_pages writes the device pool, so first-touch
        # costs are not timed, and the host pool is written here for the same reason.
        cache = CacheEngine(
            info.arch, num_blocks, block_size, info.dtype, torch.device("cpu"), info.num_local_kv_heads, num_blocks
        )
        cache.host_kv.zero_()
        kv = KVCacheManager(num_blocks, block_size, num_host_blocks=num_blocks)
        for context in contexts:
            swap_out_ms, swap_in_ms = _time_swap(kv, cache, context, repeats)
            recompute = None
            if block_size == RECOMPUTE_BLOCK_SIZE or context in RECOMPUTE_CONTEXTS_ALL_BLOCK_SIZES:
                recompute = _time_recompute(llm, corpus[:context], max(1, repeats // 2))
            num = -(-context // block_size)
            points.append(SwapPoint(block_size, context, num, swap_out_ms, swap_in_ms, recompute))
    return points


def crossover(points: list[SwapPoint]) -> int | None:
    """Shortest context whose recompute costs more than swapping out and in (at the recompute block size)."""
    timed = sorted(
        (p for p in points if p.recompute_ms is not None and p.block_size == RECOMPUTE_BLOCK_SIZE),
        key=lambda p: p.context,
    )
    for point in timed:
        if point.recompute_ms > point.swap_ms:
            return point.context
    return None


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model path (default: the embedded default model)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=list(DEFAULT_BLOCK_SIZES))
    parser.add_argument("--contexts", type=int, nargs="+", default=list(DEFAULT_CONTEXTS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results-dir", default="bench-results")


def run(args: argparse.Namespace) -> int:
    """``quire bench swap``: table, ``swap.json`` and ``swap.png`` (Fig. 19a's layout: latency vs block size)."""
    from quire.bench.report import LoadMeter, Output, load_now, print_table, pyplot

    out = Output(args.results_dir)
    load = load_now()
    meter = LoadMeter()
    with meter.measure():
        points = measure(args.model, tuple(args.block_sizes), tuple(args.contexts), args.repeats, args.dtype)
    cross = crossover(points)
    print_table(
        "Swap vs recompute (Fig. 19): one sequence preempted and restored",
        ["block size", "context", "blocks", "swap out ms", "swap in ms", "swap ms", "recompute ms", "recompute/swap"],
        [
            [
                p.block_size,
                p.context,
                p.num_blocks,
                p.swap_out_ms,
                p.swap_in_ms,
                p.swap_ms,
                p.recompute_ms,
                p.recompute_ms / p.swap_ms if p.recompute_ms is not None else None,
            ]
            for p in points
        ],
        out.console,
    )
    out.console.print(
        f"crossover (recompute > swap, block size {RECOMPUTE_BLOCK_SIZE}): "
        f"{cross if cross is not None else 'none in the measured range'} tokens; other CPUs busy: {meter.other_cpus}"
    )
    out.write_json(
        "swap",
        {
            "load": load,
            "other_cpus": meter.other_cpus,
            "crossover_tokens": cross,
            "points": [asdict(p) | {"swap_ms": p.swap_ms} for p in points],
        },
    )
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for context in sorted({p.context for p in points}):
        row = [p for p in points if p.context == context]
        axes[0].plot([p.block_size for p in row], [p.swap_ms for p in row], marker="o", label=f"swap, {context} tok")
        timed = [p for p in row if p.recompute_ms is not None]
        if len(timed) > 1:
            axes[0].plot(
                [p.block_size for p in timed],
                [p.recompute_ms for p in timed],
                "--",
                marker="s",
                label=f"recompute, {context} tok",
            )
    axes[0].set(xscale="log", yscale="log", xlabel="block size", ylabel="ms", title="latency vs block size")
    axes[0].legend(fontsize=7)
    at_bs = sorted((p for p in points if p.block_size == RECOMPUTE_BLOCK_SIZE), key=lambda p: p.context)
    axes[1].plot([p.context for p in at_bs], [p.swap_ms for p in at_bs], marker="o", label="swap out + in")
    axes[1].plot([p.context for p in at_bs], [p.recompute_ms for p in at_bs], marker="s", label="recompute")
    axes[1].set(
        xscale="log", yscale="log", xlabel="context tokens", ylabel="ms", title=f"block size {RECOMPUTE_BLOCK_SIZE}"
    )
    axes[1].legend()
    out.save_figure("swap", figure)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cli_args(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
