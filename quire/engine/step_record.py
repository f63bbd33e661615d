"""What one engine step did and how long each phase took, for observers (benchmarks, tracing).

``LLMEngine.add_step_observer(fn)`` calls ``fn(record)`` after every step, so a benchmark can
see the scheduler's decisions and the phase timings without replacing any engine component.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from quire.core.scheduler import SchedulerOutput
from quire.worker.model_runner import RunnerOutput

__all__ = ["StepObserver", "StepRecord"]


@dataclass(frozen=True)
class StepRecord:
    """One step: the schedule, the runner's result (None when nothing ran), and phase durations in seconds.

    ``schedule_s``: ``Scheduler.schedule`` (and, with speculative decoding, the proposer's drafts);
    ``execute_s``: the model forward and sampling on every rank; ``update_s``: appending tokens,
    stop checks, detokenizing and freeing finished requests.
    The scheduled sequences are live objects: read after the step, their ``num_computed_tokens``
    already include this step's tokens.
    """

    scheduler_output: SchedulerOutput
    runner_output: RunnerOutput | None
    schedule_s: float
    execute_s: float
    update_s: float


StepObserver = Callable[[StepRecord], None]
