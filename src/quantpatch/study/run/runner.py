"""Run a study: prepare every model once, then evaluate every cell on every target.

A cell is (source model, attack, patch size, seed). Its adversarial images are made once and
evaluated on every target, so all targets see exactly the same images. Each finished cell is
written to ``cells/<id>.json``; a rerun (or a resumed, interrupted run) skips it."""

from __future__ import annotations

from pathlib import Path

import yaml
from filelock import FileLock
from tqdm.auto import tqdm

from quantpatch._io import (
    content_key,
    read_json,
    require_writable_dir,
    write_json_atomic,
    write_text_atomic,
)
from quantpatch.errors import ConfigError, QuantpatchError
from quantpatch.results import CellRecord
from quantpatch.study.analyses import run_analyses
from quantpatch.study.cells import expand_cells, run_cell
from quantpatch.study.config import StudyConfig
from quantpatch.study.core import Cell, StudyContext
from quantpatch.study.executors import Executor, create_executor
from quantpatch.study.records import write_results
from quantpatch.study.stages import (
    lock_path,
    open_context,
    prepare_all_targets,
    prepare_models,
    settle_cell,
)
from quantpatch.study.validate import validate_study


def run_study(config: StudyConfig, out: str | Path, *, progress: bool = True) -> Path:
    """Run (or resume) ``config`` into ``out``; returns the path of ``results.json``.

    The report is a separate step (``quantpatch.report.build_report``): it reads only what
    this writes."""
    validate_study(config)
    executor = create_executor(config)  # None: here; refuses what it cannot start, before work
    out = require_writable_dir(out, "run folder")
    require_writable_dir(config.cache_dir, "cache folder")
    context = prepare(config, out, progress=progress, executor=executor)
    cells = expand_cells(context)
    records = executor.run_cells(context, cells) if executor else run_cells(context, cells)
    return write_results(context, records, run_analyses(context))


def prepare(
    config: StudyConfig, out: Path, *, progress: bool = True, executor: Executor | None = None
) -> StudyContext:
    """Load the data, then train, quantize and wrap every model of the study.

    ``executor`` may build the models elsewhere first (into the shared cache); they are then
    loaded here, so every later stage sees the same models whoever trained them."""
    context = open_context(config, out, progress=progress)
    claim_run_folder(out, context.config)
    if executor is not None:
        executor.build_models(context)
    prepare_models(context)
    prepare_all_targets(context)
    return context


RUN_MARKER = "run.json"
"""Names the study a run folder belongs to (its settings' fingerprint)."""

_RUN_ONLY = ("device", "cache_dir", "executor", "ray_address")
"""Settings that change where and how fast a study runs, never its numbers."""


def study_fingerprint(config: StudyConfig) -> tuple[str, dict]:
    settings = config.model_dump(mode="json", exclude=set(_RUN_ONLY))
    return content_key(settings), settings


def claim_run_folder(out: Path, config: StudyConfig) -> None:
    """A run folder belongs to one study: resuming the same study is fine, a different study
    is refused (its cells and patches would mix with the first one's) before anything is
    written. The claim is made under the folder's lock, so two runs cannot both claim it."""
    fingerprint, settings = study_fingerprint(config)
    _refuse_other_study(out, fingerprint, settings)
    with FileLock(lock_path(out, "run")):
        _refuse_other_study(out, fingerprint, settings)
        marker = {"study": config.name, "fingerprint": fingerprint, "settings": settings}
        write_json_atomic(out / RUN_MARKER, marker)
        write_text_atomic(out / "config.yaml", yaml.safe_dump(config.model_dump(mode="json")))


def _refuse_other_study(out: Path, fingerprint: str, settings: dict) -> None:
    marker = out / RUN_MARKER
    if not marker.exists():
        if (out / "results.json").exists() or (out / "cells").exists():
            raise ConfigError(
                f"run folder {out} holds results of an unknown study; use another --out"
            )
        return
    try:
        claimed = read_json(marker)
        if claimed["fingerprint"] == fingerprint:
            return
        differ = sorted(k for k in {*settings, *claimed["settings"]}
                        if settings.get(k) != claimed["settings"].get(k))  # fmt: skip
        theirs = claimed["study"]
    except (QuantpatchError, KeyError, TypeError, AttributeError):
        differ, theirs = ["?"], "an unreadable study"
    raise ConfigError(
        f"run folder {out} belongs to study '{theirs}', which differs in: {', '.join(differ)}; "
        "use another --out (or delete the folder to start over)"
    )


def run_cells(context: StudyContext, cells: list[Cell]) -> list[CellRecord]:
    """Run every cell not already on disk; return all records (old and new)."""
    records: list[CellRecord] = []
    bar = tqdm(cells, desc="cells", disable=not context.progress)
    for cell in bar:
        bar.set_postfix_str(cell.cell_id[:60])
        records.extend(settle_cell(context, cell, run_cell))
    return records
