"""The ``quire`` command line: ``quire serve``, ``quire generate`` and ``quire bench ...``."""

from __future__ import annotations

import argparse
import sys

from quire.config import EngineArgs


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    defaults = EngineArgs()
    parser.add_argument("--model", default=None, help="HF model directory or .gguf file (default: embedded SmolLM2)")
    parser.add_argument("--dtype", default=defaults.dtype, choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--block-size", type=int, default=defaults.block_size)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--kv-cache-memory-gb", type=float, default=None)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=defaults.enable_prefix_caching
    )
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument(
        "--tensor-parallel-size", "-tp", type=int, default=defaults.tensor_parallel_size,
        help="ranks to shard the model over (local worker processes, or torchrun's ranks; see README)",
    )
    parser.add_argument(
        "--swap-space", type=float, default=defaults.swap_space, help="GiB of host memory for swapped-out KV blocks"
    )
    parser.add_argument("--num-host-kv-blocks", type=int, default=None, help="exact host block count")
    parser.add_argument("--preemption-mode", default=defaults.preemption_mode, choices=["auto", "swap", "recompute"])
    parser.add_argument("--scheduling-policy", default=defaults.scheduling_policy, choices=["fcfs", "priority"])
    parser.add_argument(
        "--priority-aging-steps",
        type=int,
        default=defaults.priority_aging_steps,
        help="under --scheduling-policy priority, promote a request after waiting this many steps",
    )


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The ``EngineArgs`` keyword arguments in ``args``; an unset option (None) keeps the engine's default."""
    defaults = EngineArgs()
    kwargs = {}
    for name in EngineArgs.field_names():
        value = getattr(args, name, None)
        if hasattr(args, name) and (value is not None or getattr(defaults, name) is None):
            kwargs[name] = value
    return kwargs


def _generate(args: argparse.Namespace) -> int:
    from quire import LLM, SamplingParams

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            seed=args.sampling_seed,
            stop=args.stop or None,
            ignore_eos=args.ignore_eos,
            repetition_penalty=args.repetition_penalty,
        )
        kwargs = engine_kwargs(args)
        model = kwargs.pop("model")
        llm = LLM(model, **kwargs)
        if args.chat:
            outputs = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
        else:
            outputs = llm.generate([args.prompt], params, use_tqdm=False)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(outputs[0].outputs[0].text)
    return 0


# The step thread releases the GIL around every torch op and must get it back at once; with the
# default 5 ms switch interval the event loop (SSE, JSON) keeps it that long each time. Measured
# with `quire bench serve` at 4 req/s: mean TPOT 127 -> 98 ms, mean TTFT 286 -> 166 ms.
SERVE_GIL_SWITCH_INTERVAL_S = 0.0002


def _serve(args: argparse.Namespace) -> int:
    from quire.entrypoints.openai.api_server import run_server

    sys.setswitchinterval(SERVE_GIL_SWITCH_INTERVAL_S)  # process-wide, so set by the command only

    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            print(f"error: two models given: {args.model_tag!r} and --model {args.model!r}", file=sys.stderr)
            return 2
        args.model = args.model_tag
    try:
        return run_server(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quire", description="Quire: PagedAttention LLM inference engine")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="model path (default: embedded)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the API")
    serve.add_argument(
        "--served-model-name", nargs="+", default=None, help="name(s) clients use in 'model' (default: MODEL)"
    )
    serve.add_argument("--log-stats-interval", type=float, default=10.0, help="seconds between stats log lines")
    serve.add_argument("--uvicorn-log-level", default="warning", choices=["debug", "info", "warning", "error"])
    add_engine_args(serve)
    serve.set_defaults(func=_serve)

    gen = commands.add_parser("generate", help="complete one prompt and print the text")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--stop", action="append", default=[])
    gen.add_argument("--ignore-eos", action="store_true")
    add_engine_args(gen)
    gen.set_defaults(func=_generate)

    from quire.entrypoints import env

    env.add_parser(commands)

    bench = commands.add_parser("bench", help="benchmarks reproducing the paper's comparisons (tables, JSON, PNGs)")
    from quire.bench.cli import add_bench_commands

    add_bench_commands(bench)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
