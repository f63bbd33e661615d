"""`quire generate` prints the completion; bad arguments are a clear error, not a traceback."""

from __future__ import annotations

import pytest

from quire import SamplingParams
from quire.entrypoints.cli import main

pytestmark = pytest.mark.slow


def test_generate_prints_the_greedy_completion(capsys, llm_fp32):
    prompt = "The capital of France is"
    expected = llm_fp32.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert main(["generate", prompt, "--max-tokens", "8", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out == expected[0].outputs[0].text + "\n"


def test_generate_reports_bad_arguments(capsys):
    assert main(["generate", "hi", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", "/no/such/model.gguf"]) == 2
    assert "never downloads" in capsys.readouterr().err
