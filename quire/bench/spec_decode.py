"""Single-stream decode latency with and without speculative decoding, A/B in one process.

    quire bench throughput --speculative '{"method": "ngram", "num_speculative_tokens": 4}'
    quire bench throughput --speculative '{"model": PATH, "num_speculative_tokens": 4}'

One request at a time is where speculation pays: a CPU decode step reads every weight once
whatever the number of tokens it verifies. Two engines are loaded side by side, plain and
speculative, and every task is timed on both, alternating which goes first, so a slow phase of
a shared machine hits both. ms/token is a run's decode time, from the end of the step that
sampled its first token to the end of its last step (``time.perf_counter`` in a step observer, so
prefill is left out without subtracting a second run), over its N - 1 decoded tokens, median over
the repeats; N is what
greedy decoding produced up to ``--single-output-len`` (EOS ends it), the same for both engines
since greedy output is unchanged by speculation, which is checked on every run.

Tasks: repetitive ones (edit or summarise a given text, continue code in the style of the code
given), where prompt lookup finds most tokens, and an open-ended one, where it finds few.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from quire.config import SpeculativeConfig

_CODE = '''import json


def load_users(path):
    with open(path) as f:
        users = json.load(f)
    return [user for user in users if user["active"]]


def load_orders(path):
    with open(path) as f:
        orders = json.load(f)
    return [order for order in orders if order["paid"]]
'''
_TEXT = (
    "The committee met on Tuesday to review the budget for the new library. The architect presented "
    "three designs: a glass building by the river, a brick building next to the school, and a wooden "
    "building in the park. The glass building was the most expensive, the brick building was the "
    "cheapest, and the wooden building was the most popular with the public. After a long discussion "
    "the committee chose the brick building, because it was the cheapest and close to the school, and "
    "asked the architect to add a reading garden from the wooden design."
)
# (name, kind, chat message)
TASKS: tuple[tuple[str, str, str], ...] = (
    ("edit code", "repetitive", f"Rename load_users to read_users and load_orders to read_orders:\n\n{_CODE}"),
    ("summarise text", "repetitive", f"Summarise this text, keeping its wording where you can:\n\n{_TEXT}"),
    (
        "complete code",
        "repetitive",
        f"Add a function load_products(path) that keeps products in stock, in the same style:\n\n{_CODE}",
    ),
    ("open-ended", "open-ended", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
)
WARMUP_TOKENS = 8
KV_GB = 0.25  # per engine: thousands of tokens of the default model, plenty for one stream


@dataclass
class TaskResult:
    name: str
    kind: str
    prompt_tokens: int
    output_tokens: int
    plain_decode_s: list[float] = field(default_factory=list)  # first token to last, every repeat
    spec_decode_s: list[float] = field(default_factory=list)
    draft_tokens: int = 0
    accepted_tokens: int = 0
    drafts: int = 0
    identical: bool = True
    # Schedule (proposing included) + forward + sampling time of single-stream steps: one-token
    # decodes (plain engine) and steps that verified drafts (speculative engine), every repeat.
    plain_step_s: list[float] = field(default_factory=list)
    verify_step_s: list[float] = field(default_factory=list)

    def ms_per_token(self, which: str) -> float:
        return statistics.median(getattr(self, f"{which}_decode_s")) / (self.output_tokens - 1) * 1e3

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def tokens_per_draft_step(self) -> float | None:
        """Mean tokens emitted per verification: accepted drafts plus the target's own token."""
        return 1 + self.accepted_tokens / self.drafts if self.drafts else None

    @property
    def step_model_speedup(self) -> float | None:
        """The speedup the median step times predict: plain decodes every token in a one-token step;
        speculation spends a verify step per draft step and one-token steps on the rest.

        Step medians shrug off the load bursts of a shared machine that whole-run times absorb.
        """
        if not (self.plain_step_s and self.verify_step_s and self.spec_decode_s):
            return None
        one, verify = statistics.median(self.plain_step_s), statistics.median(self.verify_step_s)
        runs = len(self.spec_decode_s)
        decoded = self.output_tokens - 1
        steps = self.drafts / runs
        by_verify = min(decoded, (self.drafts + self.accepted_tokens) / runs)
        return decoded * one / (steps * verify + (decoded - by_verify) * one)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("plain_step_s")
        data.pop("verify_step_s")
        data.update(
            plain_step_ms=statistics.median(self.plain_step_s) * 1e3 if self.plain_step_s else None,
            verify_step_ms=statistics.median(self.verify_step_s) * 1e3 if self.verify_step_s else None,
            plain_ms_per_token=self.ms_per_token("plain"),
            spec_ms_per_token=self.ms_per_token("spec"),
            speedup=self.ms_per_token("plain") / self.ms_per_token("spec"),
            step_model_speedup=self.step_model_speedup,
            acceptance_rate=self.acceptance_rate,
            tokens_per_draft_step=self.tokens_per_draft_step,
        )
        return data


def run(
    speculative: SpeculativeConfig,
    model: str | None,
    dtype: str,
    threads: int,
    output_len: int,
    repeats: int,
    say: Callable[..., None] = print,
) -> dict[str, Any]:
    """Time every task on a plain and a speculative engine; returns the report (also printed)."""
    from quire import LLM, SamplingParams
    from quire.models.loader import chat_prompt_token_ids

    # One request at a time needs a small pool; two engines with default pools would take GBs.
    small = {"dtype": dtype, "num_threads": threads, "seed": 0, "kv_cache_memory_gb": KV_GB, "swap_space": 0}
    plain = LLM(model, **small)
    spec = LLM(model, **small, speculative_config=asdict(speculative))
    tokenizer = plain.get_tokenizer()
    engines = {"plain": plain, "spec": spec}

    def generate(
        which: str, prompt: list[int], n: int, task: TaskResult | None = None
    ) -> tuple[list[int], float, dict[str, int]]:
        llm = engines[which]
        step_ends: list[float] = []

        def observer(record) -> None:
            step_ends.append(time.perf_counter())
            if task is None or len(step_ends) == 1:  # the first step is the prefill
                return
            seconds = record.schedule_s + record.execute_s  # a draft model proposes in the schedule phase
            if which == "plain":
                task.plain_step_s.append(seconds)
            elif any(c.num_draft_slots for c in record.scheduler_output.scheduled):
                task.verify_step_s.append(seconds)

        before = llm.stats()
        llm.engine.add_step_observer(observer)
        try:
            params = SamplingParams(temperature=0, max_tokens=n)
            out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        finally:
            llm.engine.remove_step_observer(observer)
        after = llm.stats()
        # One stream, a prompt within the token budget: the first step prefills and samples token 1.
        decode_s = step_ends[-1] - step_ends[0]
        return list(out[0].outputs[0].token_ids), decode_s, {k: after[k] - before.get(k, 0) for k in after}

    results: list[TaskResult] = []
    say(HEADER)
    for name, kind, message in TASKS:
        if tokenizer.chat_template is not None:
            prompt = chat_prompt_token_ids(tokenizer, [{"role": "user", "content": message}], True, None)
        else:  # a base model: the message as plain text
            prompt = tokenizer.encode(message)
        for which in engines:  # warm-up, and no prefix-cache advantage for either engine later
            generate(which, prompt, WARMUP_TOKENS)
        reference, _, _ = generate("plain", prompt, output_len)
        task = TaskResult(name, kind, len(prompt), len(reference))
        if task.output_tokens < 2:
            say(f"  {name}: only {task.output_tokens} token(s) before EOS; skipped")
            continue
        for r in range(repeats):
            order = ("plain", "spec") if r % 2 == 0 else ("spec", "plain")
            for which in order:
                tokens, seconds, delta = generate(which, prompt, task.output_tokens, task)
                getattr(task, f"{which}_decode_s").append(seconds)
                task.identical &= tokens == reference
                if which == "spec":
                    task.draft_tokens += delta.get("num_draft_tokens", 0)
                    task.accepted_tokens += delta.get("num_accepted_tokens", 0)
                    task.drafts += delta.get("num_spec_drafts", 0)
        results.append(task)
        say(_row(task))
    return {"speculative": asdict(speculative), "dtype": dtype, "threads": threads, "repeats": repeats,
            "tasks": [t.to_json() for t in results]}


HEADER = (
    f"{'task':<16} {'kind':<11} {'prompt':>6} {'out':>4} {'plain ms/tok':>12} {'spec ms/tok':>11} "
    f"{'speedup':>7} {'accept':>7} {'tok/step':>8} {'1-tok step':>10} {'verify step':>11} {'step model':>10} "
    f"{'same':>5}"
)


def _row(t: TaskResult) -> str:
    rate = f"{100 * t.acceptance_rate:.0f}%" if t.acceptance_rate is not None else "-"
    per_step = f"{t.tokens_per_draft_step:.2f}" if t.tokens_per_draft_step is not None else "-"
    plain, spec = t.ms_per_token("plain"), t.ms_per_token("spec")
    one = f"{statistics.median(t.plain_step_s) * 1e3:.1f} ms" if t.plain_step_s else "-"
    verify = f"{statistics.median(t.verify_step_s) * 1e3:.1f} ms" if t.verify_step_s else "-"
    model = f"{t.step_model_speedup:.2f}x" if t.step_model_speedup is not None else "-"
    return (
        f"{t.name:<16} {t.kind:<11} {t.prompt_tokens:>6} {t.output_tokens:>4} {plain:>12.1f} {spec:>11.1f} "
        f"{plain / spec:>6.2f}x {rate:>7} {per_step:>8} {one:>10} {verify:>11} {model:>10} "
        f"{'yes' if t.identical else 'NO':>5}"
    )
