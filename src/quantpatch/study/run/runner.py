"""Run a study: prepare every model once, then evaluate every cell on every target.

A cell is (source model, attack, patch size, seed). Its adversarial images are made once and
evaluated on every target, so all targets see exactly the same images. Each finished cell is
sealed in ``cells/<id>.json``; a rerun (or a resumed, interrupted run) skips it."""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from quantpatch._io import require_writable_dir
from quantpatch.results import CellRecord
from quantpatch.study.grid.cells import Cell, expand_cells
from quantpatch.study.grid.scoring import run_cell
from quantpatch.study.run.analyses import run_analyses
from quantpatch.study.run.checks import validate_study
from quantpatch.study.run.executors import Executor, create_executor
from quantpatch.study.run.outputs import write_results
from quantpatch.study.run.stages import open_context, prepare_all, settle_cell
from quantpatch.study.settings.config import StudyConfig
from quantpatch.study.store.run_folder import claim_run_folder
from quantpatch.study.zoo.context import StudyContext


def run_study(config: StudyConfig, out: str | Path, *, progress: bool = True) -> Path:
    """Run (or resume) ``config`` into ``out``; returns the path of ``results.json``.

    The report is a separate step (``quantpatch.report.build_report``): it reads only what
    this writes."""
    validate_study(config)
    executor = create_executor(config)  # None: here; refuses what it cannot start, before work
    out = require_writable_dir(out, "run folder")
    require_writable_dir(config.cache_dir, "cache folder")
    first = prepare(config, out, progress=progress, executor=executor)
    models, records = [], []
    for replicate in range(first.config.replicates):
        # one replicate's models at a time: memory stays that of a study without replicates
        context = first if replicate == 0 else first.for_replicate(replicate)
        if replicate:
            prepare_replicate(context, executor)
        cells = expand_cells(context)
        records += executor.run_cells(context, cells) if executor else run_cells(context, cells)
        models += context.model_records
        if replicate == 0:
            analyses = run_analyses(context)  # the lenses read replicate 0's models
    return write_results(first, models, records, analyses)


def prepare(
    config: StudyConfig, out: Path, *, progress: bool = True, executor: Executor | None = None
) -> StudyContext:
    """Load the data, claim the run folder, then train, quantize and wrap every model of the
    study's first replicate.

    ``executor`` may build the models elsewhere first (into the shared cache); they are then
    loaded here, so every later stage sees the same models whoever trained them."""
    context = open_context(config, out, progress=progress)
    fingerprint, settings = context.config.fingerprint()
    config_yaml = yaml.safe_dump(context.config.model_dump(mode="json"))
    claim_run_folder(out, context.config.name, fingerprint, settings, config_yaml)
    prepare_replicate(context, executor)
    return context


def prepare_replicate(context: StudyContext, executor: Executor | None) -> None:
    """Every model and target of ``context``'s replicate (built elsewhere first by
    ``executor``, when there is one)."""
    if executor is not None:
        executor.build_models(context)
    prepare_all(context)


def run_cells(context: StudyContext, cells: list[Cell]) -> list[CellRecord]:
    """Run every cell not already on disk; return all records (old and new)."""
    records: list[CellRecord] = []
    started = time.perf_counter()
    bar = tqdm(cells, desc="cells", disable=not context.progress)
    for cell in bar:
        bar.set_postfix_str(cell.cell_id[:60])
        records.extend(settle_cell(context, cell, run_cell))
    context.log(f"{len(cells)} cells done in {time.perf_counter() - started:.1f} s")
    return records
