"""What one engine step did and how long its phases took, for observers (benchmarks, tracing)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from quire.core.scheduler import SchedulerOutput
from quire.worker.model_runner import RunnerOutput


@dataclass(frozen=True)
class StepRecord:
    """One call of ``LLMEngine.step``.

    ``runner_output`` is None when the scheduler had nothing to run (an empty
    ``scheduler_output``): then nothing executed and ``execute_s`` and ``update_s`` are 0.
    Timings are wall-clock seconds: scheduling, the model step on every rank (block operations,
    forward, sampling), and applying the results to the requests.

    The outputs reference the engine's live objects (requests, sequences): read them in the
    observer; they change in later steps.
    """

    scheduler_output: SchedulerOutput
    runner_output: RunnerOutput | None
    schedule_s: float
    execute_s: float
    update_s: float


StepObserver = Callable[[StepRecord], None]
