"""``quire generate PROMPT``: one completion through ``LLM``, printed; a quick check of a model and its flags."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from quire.entrypoints.engine_args import add_engine_args, engine_kwargs
from quire.sampling_params import SamplingParams

# (flag, SamplingParams field, type, help). --sampling-seed, not --seed: --seed is the engine's.
_SAMPLING_FLAGS = (
    ("--max-tokens", "max_tokens", int, "most tokens to generate"),
    ("--temperature", "temperature", float, "0 is greedy"),
    ("--top-p", "top_p", float, "sample from the fewest tokens holding this much probability"),
    ("--top-k", "top_k", int, "sample from the k most likely tokens (0: no limit)"),
    ("--min-p", "min_p", float, "drop tokens less likely than this fraction of the likeliest"),
    ("--repetition-penalty", "repetition_penalty", float, "above 1 discourages tokens already seen"),
    ("--sampling-seed", "seed", int, "per-request sampling seed"),
)
# Where this command departs from SamplingParams: a longer completion, and greedy so that the same
# command prints the same text. Every other default is SamplingParams'.
_GENERATE_DEFAULTS = {"max_tokens": 64, "temperature": 0.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    group = parser.add_argument_group("sampling arguments", "SamplingParams' fields (--sampling-seed is its seed)")
    defaults = {f.name: f.default for f in fields(SamplingParams)}
    for flag, name, value_type, help_text in _SAMPLING_FLAGS:
        default = _GENERATE_DEFAULTS.get(name, defaults[name])
        if default is not None:
            help_text += " (default: %(default)s)"
        group.add_argument(flag, dest=_dest(flag), type=value_type, default=default, help=help_text)
    group.add_argument("--stop", action="append", default=[], help="a stop string (repeat for several)")
    group.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    add_engine_args(parser)
    parser.set_defaults(func=run)


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def run(args: argparse.Namespace) -> int:
    from quire import LLM

    try:
        params = SamplingParams(
            **{name: getattr(args, _dest(flag)) for flag, name, _, _ in _SAMPLING_FLAGS},
            stop=args.stop or None,
            ignore_eos=args.ignore_eos,
        )
        kwargs = engine_kwargs(args)
        llm = LLM(**kwargs)
        if args.chat:
            outputs = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
        else:
            outputs = llm.generate([args.prompt], params, use_tqdm=False)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(outputs[0].outputs[0].text)
    return 0
