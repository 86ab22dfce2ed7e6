"""Run a study: prepare every model once, then evaluate every cell on every target.

A cell is (source model, attack, patch size, seed). Its adversarial images are made once and
evaluated on every target, so all targets see exactly the same images. Each finished cell is
written to ``cells/<id>.json``; a rerun (or a resumed, interrupted run) skips it."""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from pydantic import ValidationError
from tqdm.auto import tqdm

from quantpatch._io import read_json, write_json_atomic, write_text_atomic
from quantpatch._runtime import resolve_device, seed_everything
from quantpatch.data import load_dataset
from quantpatch.errors import QuantpatchError
from quantpatch.results import CellRecord
from quantpatch.study.analyses import run_analyses
from quantpatch.study.artifacts import (
    control_schedules,
    prepare_control,
    prepare_fp32,
    prepare_quantized,
)
from quantpatch.study.cells import expand_cells, run_cell
from quantpatch.study.config import StudyConfig
from quantpatch.study.core import ArtifactCache, Cell, PreparedModel, StudyContext
from quantpatch.study.records import write_results
from quantpatch.study.targets import prepare_targets
from quantpatch.study.validate import validate_against_data, validate_study


def run_study(config: StudyConfig, out: str | Path, *, progress: bool = True) -> Path:
    """Run (or resume) ``config`` into ``out``; returns the path of ``results.json``.

    The report is a separate step (``quantpatch.report.build_report``): it reads only what
    this writes."""
    validate_study(config)
    context = prepare(config, Path(out), progress=progress)
    records = run_cells(context, expand_cells(context))
    return write_results(context, records, run_analyses(context))


def prepare(config: StudyConfig, out: Path, *, progress: bool = True) -> StudyContext:
    """Load the data, then train, quantize and wrap every model of the study."""
    seed_everything(config.seeds[0])
    dataset = load_dataset(
        config.dataset,
        config.data_root,
        download=config.download,
        seed=config.data_seed,
        limit=config.limit,
    )
    validate_against_data(config, dataset)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", yaml.safe_dump(config.model_dump(mode="json")))
    context = StudyContext(
        config, out, resolve_device(config.device), dataset, ArtifactCache(config.cache_dir),
        progress=progress,
    )  # fmt: skip
    prepare_models(context)
    prepare_targets(context)
    return context


def prepare_models(context: StudyContext) -> None:
    """The fp32 model of every architecture, then each of its quantized precisions."""
    for arch in context.config.models:
        started = time.perf_counter()
        base = prepare_fp32(context, arch)
        context.models[base.name] = base
        for spec in context.config.precisions:
            if not spec.is_float:
                prepared = prepare_quantized(context, base, spec)
                context.models[prepared.name] = prepared
        if context.config.controls:
            _prepare_controls(context, base)
        if context.progress:
            tqdm.write(f"models for {arch} ready in {time.perf_counter() - started:.1f} s")


def _prepare_controls(context: StudyContext, base: PreparedModel) -> None:
    config = context.config
    for tag, schedule in control_schedules(context).items():
        control = prepare_control(context, base, schedule, tag)
        context.models[control.name] = control
        context.control_of[control.name] = [
            m.name
            for m in context.siblings(base.arch)
            if m.spec.method == "qat" and not m.spec.is_float
            and config.qat_config_for(m.spec) == schedule
        ]  # fmt: skip


def run_cells(context: StudyContext, cells: list[Cell]) -> list[CellRecord]:
    """Run every cell not already on disk; return all records (old and new)."""
    records: list[CellRecord] = []
    bar = tqdm(cells, desc="cells", disable=not context.progress)
    for cell in bar:
        bar.set_postfix_str(cell.cell_id[:60])
        path = context.out / "cells" / f"{cell.cell_id}.json"
        cached = _read_cell(path, cell.key)
        if cached is None:
            cached = run_cell(context, cell)
            data = {"key": cell.key, "records": [r.model_dump(mode="json") for r in cached]}
            write_json_atomic(path, data)
        records.extend(cached)
    return records


def _read_cell(path: Path, key: str) -> list[CellRecord] | None:
    """The records of a finished cell, or None when absent, stale or unreadable (recompute)."""
    if not path.exists():
        return None
    try:
        data = read_json(path)
        if not isinstance(data, dict) or data.get("key") != key:
            return None
        return [CellRecord.model_validate(r) for r in data["records"]]
    except (QuantpatchError, ValidationError, KeyError, TypeError):
        return None
