"""Shared by the fidelity tests: the prompts, transformers' greedy reference, and the near-tie rule."""

from __future__ import annotations

import torch

from quire import LLM, SamplingParams

NEW_TOKENS = 32
TOP = 5

_PARAGRAPH = (
    "PagedAttention stores the key and value cache of a transformer in fixed-size blocks that are "
    "reached through a block table, much as an operating system maps virtual pages to physical frames. "
)


def fidelity_prompts(tokenizer) -> list[list[int]]:
    texts = [
        "Hello",
        "The capital of France is",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
        "List three colours of the rainbow:\n1.",
        "Question: What is 12 times 12?\nAnswer:",
        _PARAGRAPH * 3 + "In one sentence, the main benefit is",
        "Once upon a time, in a village by the sea, " * 6,
        _PARAGRAPH * 8 + "Summary:",
    ]
    prompts = [tokenizer.encode(t) for t in texts]
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a haiku about memory pages."}],
        add_generation_prompt=True, tokenize=True, return_dict=False,
    )
    prompts.append(list(chat))
    lengths = [len(p) for p in prompts]
    assert min(lengths) <= 5 and 250 <= max(lengths) <= 300, lengths
    return prompts


def reference(hf_model, prompt: list[int]):
    """transformers generate(): greedy tokens and the raw log-softmax at each step."""
    out = hf_model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = torch.log_softmax(torch.cat(out.logits).float(), dim=-1)
    return tokens, logprobs


def compare(quire_output, ref_tokens, ref_logprobs) -> bool:
    """True if identical; False if they part at a near tie. Fails on anything else."""
    out = quire_output.outputs[0]
    for i, (mine, ref) in enumerate(zip(out.token_ids, ref_tokens, strict=True)):
        position = out.logprobs[i]
        if mine != ref:
            ref_top = ref_logprobs[i].topk(TOP).indices.tolist()
            assert ref in position and mine in ref_top, (
                f"token {i}: quire {mine} vs transformers {ref} is not a near tie "
                f"(quire top-{TOP} {list(position)}, transformers top-{TOP} {ref_top})"
            )
            return False
        assert abs(position[mine].logprob - ref_logprobs[i, ref].item()) < 1e-3, (
            f"token {i}: logprob {position[mine].logprob} vs {ref_logprobs[i, ref].item()}"
        )
    return True


def check_against_reference(llm: LLM, hf_model, prompts: list[list[int]]) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=TOP)
    references = [reference(hf_model, p) for p in prompts]
    alone = [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0] for p in prompts]
    batched = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for outputs in (alone, batched):
        diverged = [not compare(o, *ref) for o, ref in zip(outputs, references, strict=True)]
        assert sum(diverged) <= 1, f"{sum(diverged)} of {len(prompts)} prompts diverged"
    assert llm.stats()["num_free_kv_blocks"] == llm.stats()["num_kv_blocks"]
