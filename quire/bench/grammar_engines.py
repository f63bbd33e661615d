"""Grammar engines compared on the default model's vocabulary: what chose Quire's structured-output backend.

For each of xgrammar, llguidance and outlines-core this measures, on one JSON schema: the one-off
set-up for the tokenizer, the schema's compile time, and the cost of one next-token mask (a bitmask
over the whole vocabulary) while walking a valid document token by token. Run it directly:
``python -m quire.bench.grammar_engines``. It prints one line per engine; each engine is optional.
"""

from __future__ import annotations

import json
import time

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.[a-z]{2,3}$"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "email", "role", "tags", "address"],
    "additionalProperties": False,
}
DOCUMENT = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.org",
    "role": "admin",
    "tags": ["math", "engines", "poetry"],
    "address": {"city": "London", "zip": "12345"},
}


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def bench_xgrammar(tokenizer, vocab_size: int, eos: int, tokens: list[int]) -> dict:
    import xgrammar as xgr

    info, setup = _timed(lambda: xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                                     stop_token_ids=[eos]))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    compiled, compile_s = _timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA)))
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    mask_s = 0.0
    for token in tokens:
        mask_s += _timed(lambda: matcher.fill_next_token_bitmask(bitmask))[1]
        assert matcher.accept_token(token)
    return {"setup_s": setup, "compile_s": compile_s, "mask_us": 1e6 * mask_s / len(tokens)}


def bench_llguidance(tokenizer, vocab_size: int, eos: int, tokens: list[int]) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok, setup = _timed(lambda: llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    matcher, compile_s = _timed(lambda: llguidance.LLMatcher(lltok, grammar))
    assert not matcher.is_error(), matcher.get_error()
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)
    mask_s = 0.0
    for token in tokens:
        mask_s += _timed(lambda: llguidance.torch.fill_next_token_bitmask(matcher, bitmask))[1]
        assert matcher.consume_token(token), matcher.get_error()
    return {"setup_s": setup, "compile_s": compile_s, "mask_us": 1e6 * mask_s / len(tokens)}


def bench_outlines_core(tokenizer, vocab_size: int, eos: int, tokens: list[int]) -> dict:
    import outlines_core

    def vocabulary():
        words: dict[str, list[int]] = {}
        for token, token_id in tokenizer.get_vocab().items():
            if token_id != eos:
                words.setdefault(tokenizer.convert_tokens_to_string([token]), []).append(token_id)
        return outlines_core.Vocabulary(eos, words)

    vocab, setup = _timed(vocabulary)
    regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
    index, compile_s = _timed(lambda: outlines_core.Index(regex, vocab))
    guide = outlines_core.Guide(index)
    mask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
    mask_s = 0.0
    walked = 0
    for token in tokens:
        mask_s += _timed(lambda: guide.write_mask_into(mask.data_ptr(), mask.numel(), 4))[1]
        walked += 1
        try:
            guide.advance(token)
        except ValueError:  # its vocabulary spells some byte-level tokens differently: stop the walk there
            break
    return {"setup_s": setup, "compile_s": compile_s, "mask_us": 1e6 * mask_s / walked}


def step_overhead(tokenizer, vocab_size: int, eos: int, tokens: list[int], rows: int) -> dict:
    """What Quire adds to a decode step with ``rows`` constrained rows (xgrammar): filling each row's
    mask, applying the packed masks to the logits, and advancing each matcher by its token."""
    import xgrammar as xgr

    from quire.sampling import token_bitmask

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=[eos])
    compiled = xgr.GrammarCompiler(info, max_threads=1).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(rows)]
    logits = torch.randn(rows, vocab_size)
    fill_s = apply_s = accept_s = 0.0
    for token in tokens:
        bitmask = token_bitmask.all_allowed(rows, vocab_size)
        start = time.perf_counter()
        for row, matcher in enumerate(matchers):
            matcher.fill_next_token_bitmask(bitmask, row)
        fill_s += time.perf_counter() - start
        masked = logits.clone()
        start = time.perf_counter()
        xgr.apply_token_bitmask_inplace(masked, bitmask, indices=list(range(rows)))
        apply_s += time.perf_counter() - start
        start = time.perf_counter()
        for matcher in matchers:
            matcher.accept_token(token)
        accept_s += time.perf_counter() - start
    steps = len(tokens)
    return {"fill_ms": 1e3 * fill_s / steps, "apply_ms": 1e3 * apply_s / steps, "accept_ms": 1e3 * accept_s / steps}


ENGINES = {"xgrammar": bench_xgrammar, "llguidance": bench_llguidance, "outlines-core": bench_outlines_core}


def main() -> None:
    from quire.models.loader import default_model_path, load_tokenizer

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(default_model_path())
    vocab_size = len(tokenizer)
    tokens = tokenizer.encode(json.dumps(DOCUMENT), add_special_tokens=False)
    print(f"vocabulary {vocab_size} tokens; document {len(tokens)} tokens")
    for name, bench in ENGINES.items():
        try:
            figures = bench(tokenizer, vocab_size, tokenizer.eos_token_id, tokens)
        except ImportError as exc:
            print(f"{name:14s} not installed ({exc})")
            continue
        print(
            f"{name:14s} tokenizer set-up {figures['setup_s'] * 1e3:8.1f} ms   schema compile "
            f"{figures['compile_s'] * 1e3:8.1f} ms   mask {figures['mask_us']:8.1f} us/token"
        )
    for rows in (1, 8, 32):
        cost = step_overhead(tokenizer, vocab_size, tokenizer.eos_token_id, tokens, rows)
        print(
            f"Quire step, {rows:2d} constrained rows: fill masks {cost['fill_ms']:6.3f} ms   apply "
            f"{cost['apply_ms']:6.3f} ms   advance matchers {cost['accept_ms']:6.3f} ms"
        )


if __name__ == "__main__":
    main()
