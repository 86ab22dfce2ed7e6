"""Where a study's work runs: in this process (the default) or on a Ray cluster.

An executor only decides where models are built and cells are computed; the runner keeps
everything else (the run folder, the cell files, the results), so a study gives the same
files, checksums and resume behaviour whichever executor ran it. Ray is optional: it is
imported only when a study asks for it."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from quantpatch.errors import ConfigError
from quantpatch.results import CellRecord

if TYPE_CHECKING:
    from quantpatch.study.grid.cells import Cell
    from quantpatch.study.settings.config import StudyConfig
    from quantpatch.study.zoo.context import StudyContext


class Executor(Protocol):
    """Builds a study's models and computes its cells somewhere other than this process."""

    def build_models(self, context: StudyContext) -> None:
        """Fill the shared cache with every model of the study (the runner then loads them)."""

    def run_cells(self, context: StudyContext, cells: list[Cell]) -> list[CellRecord]:
        """Every cell's records, in the order of ``cells``, each written as the runner does."""


def create_executor(config: StudyConfig) -> Executor | None:
    """The study's executor (None: run here); refuses one it cannot start, in one line."""
    if config.executor == "local":
        if config.ray_address is not None:
            raise ConfigError("ray_address is set, but the executor is local; add --executor ray")
        return None
    if importlib.util.find_spec("ray") is None:
        raise ConfigError("executor 'ray' needs Ray: pip install 'quantpatch[ray]'")
    from quantpatch.study.run.ray_executor import RayExecutor

    return RayExecutor(config.ray_address)


@dataclass(frozen=True)
class ScalingEstimate:
    """Bounds on a study's wall time on ``workers`` equal workers (one GPU each, say)."""

    workers: int
    lower_s: float
    """No schedule beats the serial part plus max(longest task, total work / workers)."""
    upper_s: float
    """Greedy scheduling (as Ray's is) ends by the serial part + total / workers + longest."""


def estimate_scaling(
    records: Iterable[CellRecord], workers: int, serial_s: float = 0.0
) -> ScalingEstimate:
    """Bound the time of a study's cells on ``workers`` workers from their recorded times.

    ``serial_s`` is what runs before any cell can start (the model preparation's critical
    path: an architecture's fp32 training then its slowest quantization)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    seconds = list(cell_seconds(records).values())
    total, longest = sum(seconds), max(seconds, default=0.0)
    return ScalingEstimate(
        workers,
        lower_s=serial_s + max(longest, total / workers),
        upper_s=serial_s + total / workers + longest,
    )


def cell_seconds(records: Iterable[CellRecord]) -> dict[str, float]:
    """Seconds per cell: its recorded wall time, else the sum of its parts (older files)."""
    seconds: dict[str, float] = {}
    for record in records:
        t = record.timings
        if t.wall_s is not None:
            seconds[record.cell] = t.wall_s
        else:
            seconds[record.cell] = seconds.get(record.cell, t.fit_s + t.perturb_s) + t.eval_s
    return seconds
