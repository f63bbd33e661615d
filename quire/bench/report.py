"""What every ``quire bench`` subcommand writes: a terminal table, a JSON file, PNG figures.

Kept apart from the benchmarks so their modules only compute; the figure layouts that mirror
the paper's live with each benchmark, this module only saves them.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # rich is the optional `quire[bench]` extra: imported where a table is drawn
    from rich.console import Console

__all__ = ["LoadMeter", "Output", "load_now", "print_table"]


def print_table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], console: Console | None = None
) -> None:
    """One rich table; floats are printed with 3 significant decimals unless already strings."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    (console or Console(width=200)).print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def load_now() -> dict[str, Any]:
    """The machine's load when a run starts: load averages and the busiest other processes' CPU."""
    load = None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return {"load_average": load, "logical_cpus": os.cpu_count(), "time": datetime.datetime.now().isoformat()}


@dataclass
class LoadMeter:
    """CPU that *other* processes used during timed runs (in CPUs), so figures can say how loaded the machine was."""

    samples: list[float] = field(default_factory=list)

    @contextmanager
    def measure(self) -> Iterator[None]:
        from quire.bench.throughput import contention, cpu_snapshot

        before = cpu_snapshot()
        yield
        others = contention(before, cpu_snapshot())["other_cpus"]
        if others is not None:
            self.samples.append(others)

    @property
    def other_cpus(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 2) if self.samples else None


class Output:
    """A results directory: ``NAME.json`` and ``NAME*.png`` files, paths printed as they are written."""

    def __init__(self, results_dir: str | Path, console: Console | None = None) -> None:
        from rich.console import Console

        self.dir = Path(results_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        # A pipe or a log file gets wide tables instead of columns cut to 80 characters.
        self.console = console or (Console() if Console().is_terminal else Console(width=200))

    def write_json(self, name: str, payload: dict[str, Any]) -> Path:
        path = self.dir / f"{name}.json"
        payload = {"written": time.strftime("%Y-%m-%dT%H:%M:%S"), **payload}
        path.write_text(json.dumps(_plain(payload), indent=2) + "\n")
        self.console.print(f"wrote {path}")
        return path

    def save_figure(self, name: str, figure) -> Path:
        import matplotlib.pyplot as plt

        path = self.dir / f"{name}.png"
        figure.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(figure)
        self.console.print(f"wrote {path}")
        return path


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.repr}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    return value


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
