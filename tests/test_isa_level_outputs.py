"""The real model's greedy outputs are the same at every ISA level this CPU runs (float32).

The engine's own level is checked against transformers by test_fidelity; each other level runs the
same batch in a process of its own (``QUIRE_CPU_ISA``) and must produce the same tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from fidelity_utils import fidelity_prompts

from quire import SamplingParams
from quire.kernels import cpu_kernel

pytestmark = pytest.mark.slow

NEW_TOKENS = 24
OTHER_LEVELS = [level for level in cpu_kernel.isa_levels() if level != cpu_kernel.isa_level()]

RUN = """
import json, sys
from quire import LLM, SamplingParams
from quire.kernels import cpu_kernel
prompts = json.loads(sys.stdin.read())
llm = LLM(dtype="float32", seed=0)
params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
print(json.dumps({"level": cpu_kernel.isa_level(), "tokens": [list(o.outputs[0].token_ids) for o in outputs]}))
""".replace("NEW_TOKENS", str(NEW_TOKENS))


@pytest.mark.parametrize("level", OTHER_LEVELS)
def test_greedy_outputs_equal_the_engine_level(level, llm_fp32, tokenizer):
    prompts = fidelity_prompts(tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    want = [list(o.outputs[0].token_ids)
            for o in llm_fp32.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    env = {**os.environ, cpu_kernel.ISA_ENV: level}
    done = subprocess.run([sys.executable, "-c", RUN], input=json.dumps(prompts), env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["level"] == level
    assert got["tokens"] == want
