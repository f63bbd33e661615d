"""Benchmarks and other tools reach the engine through its public API only.

Replacing an engine component from outside (``engine.scheduler = ...``) or a method
(``scheduler.schedule = ...``) silently stops applying whatever the engine derives when it
builds them (block size, max_model_len cap, swap space, tensor parallelism). The engine
offers seams instead: ``EngineArgs`` (``kv_allocator``, ``block_size``, ...), step observers,
``kv_usage`` / ``model_info`` / ``stats``.
"""

from __future__ import annotations

import re
from pathlib import Path

import quire

ROOT = Path(quire.__file__).parent
# An attribute of something named like an engine assigned to, or a component's method replaced.
FORBIDDEN = [
    re.compile(r"\bengine\.\w+(\.\w+)*\s*=(?!=)"),
    re.compile(r"\.(schedule|step|execute|allocate_slots|add_request)\s*=(?!=)"),
    re.compile(r"\bsetattr\(\s*\w*engine\b"),
]


def _offences() -> list[str]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "engine":
            continue  # the engine assigns its own attributes
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(p.search(code) for p in FORBIDDEN):
                found.append(f"quire/{rel}:{number}: {line.strip()}")
    return found


def test_nothing_outside_the_engine_assigns_engine_attributes_or_replaces_methods():
    assert _offences() == []


def test_the_check_catches_what_it_is_meant_to():
    samples = ["engine.scheduler = Scheduler(c, kv)", "llm.engine.kv_cache = a", "self.scheduler.schedule = rec"]
    assert all(any(p.search(s) for p in FORBIDDEN) for s in samples)
    assert not any(p.search("if engine.x == 1:") for p in FORBIDDEN)


def test_core_stays_free_of_torch():
    for path in (ROOT / "core").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import torch|from torch)", text, re.M), path
