"""The stages of a run that every executor shares: opening a study's context, preparing its
models and targets, and finishing a cell (read from its checksummed file, or computed and
written there). The runner drives them locally; the Ray executor's tasks call the same ones,
so files, cache entries and resume behave the same wherever a stage runs."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock
from pydantic import ValidationError
from tqdm.auto import tqdm

from quantpatch._io import read_json, write_json_atomic
from quantpatch._runtime import resolve_device, seed_everything
from quantpatch.data import Dataset, load_dataset
from quantpatch.errors import QuantpatchError
from quantpatch.results import CellRecord
from quantpatch.study.artifacts import (
    control_schedules,
    prepare_control,
    prepare_fp32,
    prepare_quantized,
    prepare_recipe,
)
from quantpatch.study.cache import ArtifactCache, warn
from quantpatch.study.config import StudyConfig
from quantpatch.study.core import Cell, PreparedModel, StudyContext
from quantpatch.study.defended import prepare_defended_targets
from quantpatch.study.targets import prepare_targets
from quantpatch.study.validate import validate_against_data


def prepare_all_targets(context: StudyContext) -> None:
    """Every target: the models, the ONNX Runtime ones, then each behind every defence."""
    prepare_targets(context)
    prepare_defended_targets(context)


def study_dataset(config: StudyConfig) -> Dataset:
    """The study's dataset, split and subset as its settings say."""
    return load_dataset(
        config.dataset,
        config.data_root,
        download=config.download,
        seed=config.data_seed,
        limit=config.limit,
    )


def open_context(config: StudyConfig, out: Path, *, progress: bool = True) -> StudyContext:
    """The data and cache of a run, before any model: what every worker of a cluster rebuilds
    from the config (cheaper than shipping tensors)."""
    seed_everything(config.seeds[0])
    dataset = study_dataset(config)
    validate_against_data(config, dataset)
    if config.n_eval > len(dataset.test):  # the default on a small (--limit) dataset
        config = config.model_copy(update={"n_eval": len(dataset.test)})
    return StudyContext(
        config, out, resolve_device(config.device), dataset, ArtifactCache(config.cache_dir),
        progress=progress,
    )  # fmt: skip


def lock_path(out: Path, name: str) -> Path:
    """The lock file of one resource of a run folder (the folder itself, or a cell)."""
    return out / ".locks" / f"{name}.lock"


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
        for settings in context.config.recipes:
            for prepared in prepare_recipe(context, base, settings):
                context.models[prepared.name] = prepared
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


def settle_cell(
    context: StudyContext, cell: Cell, compute: Callable[[StudyContext, Cell], list[CellRecord]]
) -> list[CellRecord]:
    """The cell's records from its file, or ``compute``-d and written there (atomically, with
    their checksum): the one way any executor finishes a cell, so files and resume agree."""
    path = _cell_path(context, cell)
    # one lock per cell: a concurrent run of the same study waits, then reads the file
    with FileLock(lock_path(context.out, f"cell-{cell.cell_id}")):
        cached = _read_cell(path, cell.key)
        if cached is None:
            cached = compute(context, cell)
            rows = [r.model_dump(mode="json") for r in cached]
            write_json_atomic(path, {"key": cell.key, "records": rows, "sha256": _digest(rows)})
    return cached


def finished_cell(context: StudyContext, cell: Cell) -> list[CellRecord] | None:
    """The records of a cell already on disk (None: it still has to run)."""
    with FileLock(lock_path(context.out, f"cell-{cell.cell_id}")):
        return _read_cell(_cell_path(context, cell), cell.key)


def _cell_path(context: StudyContext, cell: Cell) -> Path:
    return context.out / "cells" / f"{cell.cell_id}.json"


def _read_cell(path: Path, key: str) -> list[CellRecord] | None:
    """The records of a finished cell, or None when absent or stale; a damaged file (cut
    short, edited into impossible numbers) is reported and recomputed."""
    if not path.exists():
        return None
    try:
        data = read_json(path)
        if data.get("key") != key:
            return None
        if data.get("sha256") != _digest(data["records"]):
            raise ValueError("checksum mismatch: edited or damaged")
        return [CellRecord.model_validate(r) for r in data["records"]]
    except (QuantpatchError, ValueError, KeyError, TypeError, AttributeError) as exc:
        problem = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        warn(f"damaged cell file {path} ({problem.splitlines()[0]}); recomputing it")
        return None


def _digest(rows: list) -> str:
    """Checksum of a cell's records: a hand-edited number is caught, not trusted."""
    blob = json.dumps(rows, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
