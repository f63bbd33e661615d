"""The offline API, shaped like vLLM's ``LLM``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as SequenceABC
from typing import Any

from tqdm.auto import tqdm

from quire.config import EngineArgs
from quire.engine.llm_engine import LLMEngine
from quire.models.loader import chat_prompt_token_ids
from quire.outputs import BeamSearchOutput, BeamSearchSequence, RequestOutput
from quire.sampling_params import BeamSearchParams, SamplingParams

Prompt = str | dict[str, Any]


class LLM:
    """Load a model once, then ``generate`` or ``chat`` over batches of prompts.

    ``LLM()`` loads the embedded default model; ``LLM(model=PATH)`` a Hugging Face directory
    or a GGUF file. Keyword arguments are ``EngineArgs`` (vLLM's names).
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(EngineArgs.field_names())
        if unknown:
            raise TypeError(f"unknown engine arguments: {sorted(unknown)}")
        self.engine = LLMEngine(EngineArgs(model=model, **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def stats(self) -> dict[str, int]:
        return self.engine.stats()

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix block, so the next prompts are computed in full."""
        return self.engine.reset_prefix_cache()

    def beam_search(
        self,
        prompts: Prompt | SequenceABC[Prompt],
        params: BeamSearchParams,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """Beam search over each prompt, inside the engine (beams share KV blocks); best beams first.

        Ranking and stopping follow transformers' ``generate(num_beams=...)``; see
        ``quire.sampling.beam_search``.
        """
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}.")
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        prompts = list(prompts)
        results = self._run(prompts, [params] * len(prompts), use_tqdm)
        tokenizer = self.engine.tokenizer
        outputs = []
        for result in results:
            prompt_ids = list(result.prompt_token_ids)
            sequences = [
                BeamSearchSequence(
                    tokens=prompt_ids + out.token_ids,
                    text=tokenizer.decode(prompt_ids + out.token_ids, skip_special_tokens=True),
                    cum_logprob=out.cumulative_logprob if out.cumulative_logprob is not None else 0.0,
                    score=out.score,
                    num_prompt_tokens=len(prompt_ids),
                    output_text=out.text,
                    finish_reason=out.finish_reason,
                )
                for out in result.outputs
            ]
            outputs.append(BeamSearchOutput(sequences))
        return outputs

    def generate(
        self,
        prompts: Prompt | SequenceABC[Prompt],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: SequenceABC[int] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order.

        ``priority`` (one int per prompt, lower is more urgent) needs ``scheduling_policy="priority"``.
        """
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"sampling_params has {len(params_list)} entries for {len(prompts)} prompts; "
                    "pass one SamplingParams or one per prompt."
                )
        if priority is not None:
            priority = list(priority)
            if len(priority) != len(prompts):
                raise ValueError(
                    f"priority has {len(priority)} entries for {len(prompts)} prompts; pass one per prompt."
                )
        return self._run(prompts, params_list, use_tqdm, priority)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate.

        ``tools`` (OpenAI's ``{"type": "function", "function": {...}}`` dicts) are rendered into the
        prompt as the server renders them; ``quire.tool_calls.parse_tool_calls`` reads calls out of the text.
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.engine.tokenizer
        prompts = []
        for conversation in conversations:
            token_ids = chat_prompt_token_ids(tokenizer, conversation, add_generation_prompt, chat_template, tools)
            prompts.append({"prompt": tokenizer.decode(token_ids), "prompt_token_ids": token_ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(
        self,
        prompts: list[Prompt],
        params_list: list[SamplingParams] | list[BeamSearchParams],
        use_tqdm: bool,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        engine = self.engine
        ids: list[str] = []
        priorities = priority if priority is not None else [0] * len(prompts)
        try:
            for prompt, params, prio in zip(prompts, params_list, priorities, strict=True):
                request_id = str(next(self._ids))
                engine.add_request(request_id, prompt, params, priority=prio)
                ids.append(request_id)
        except Exception:
            for request_id in ids:  # leave the engine as it was: no half-submitted batch
                engine.abort_request(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        generated = 0
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        generated += sum(len(o.token_ids) for o in output.outputs)
                        bar.update(1)
                        elapsed = bar.format_dict["elapsed"] or 1e-9
                        bar.set_postfix_str(f"output {generated / elapsed:.1f} tok/s")
        except BaseException:
            for request_id in ids:
                if request_id not in finished:
                    engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [finished[request_id] for request_id in ids]
