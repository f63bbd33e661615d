"""The ``quire`` command line: ``quire generate`` (and, later, ``serve`` and ``bench``)."""

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


def engine_kwargs(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in EngineArgs.field_names() if hasattr(args, name)}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quire", description="Quire: PagedAttention LLM inference engine")
    commands = parser.add_subparsers(dest="command", required=True)

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

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
