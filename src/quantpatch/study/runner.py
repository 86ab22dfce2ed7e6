"""Run a study: prepare every model once, then evaluate every cell on every target.

A cell is (source model, attack, patch size, seed). Its adversarial images are made once and
evaluated on every target, so all targets see exactly the same images. Each finished cell is
written to ``cells/<id>.json``; a rerun (or a resumed, interrupted run) skips it."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from filelock import FileLock
from pydantic import ValidationError
from tqdm.auto import tqdm

from quantpatch._io import (
    content_key,
    read_json,
    require_writable_dir,
    write_json_atomic,
    write_text_atomic,
)
from quantpatch._runtime import resolve_device, seed_everything
from quantpatch.data import load_dataset
from quantpatch.errors import ConfigError, QuantpatchError
from quantpatch.results import CellRecord
from quantpatch.study.analyses import run_analyses
from quantpatch.study.artifacts import (
    control_schedules,
    prepare_control,
    prepare_fp32,
    prepare_quantized,
)
from quantpatch.study.cache import ArtifactCache, warn
from quantpatch.study.cells import expand_cells, run_cell
from quantpatch.study.config import StudyConfig
from quantpatch.study.core import Cell, PreparedModel, StudyContext
from quantpatch.study.defended import prepare_defended_targets
from quantpatch.study.executors import Executor, create_executor
from quantpatch.study.records import write_results
from quantpatch.study.targets import prepare_targets
from quantpatch.study.validate import validate_against_data, validate_study


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


def prepare_all_targets(context: StudyContext) -> None:
    """Every target: the models, the ONNX Runtime ones, then each behind every defence."""
    prepare_targets(context)
    prepare_defended_targets(context)


def open_context(config: StudyConfig, out: Path, *, progress: bool = True) -> StudyContext:
    """The data and cache of a run, before any model: what every worker of a cluster rebuilds
    from the config (cheaper than shipping tensors)."""
    seed_everything(config.seeds[0])
    dataset = load_dataset(
        config.dataset,
        config.data_root,
        download=config.download,
        seed=config.data_seed,
        limit=config.limit,
    )
    validate_against_data(config, dataset)
    if config.n_eval > len(dataset.test):  # the default on a small (--limit) dataset
        config = config.model_copy(update={"n_eval": len(dataset.test)})
    return StudyContext(
        config, out, resolve_device(config.device), dataset, ArtifactCache(config.cache_dir),
        progress=progress,
    )  # fmt: skip


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
    with FileLock(_lock(out, "run")):
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


def _lock(out: Path, name: str) -> Path:
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
        records.extend(settle_cell(context, cell, run_cell))
    return records


def settle_cell(
    context: StudyContext, cell: Cell, compute: Callable[[StudyContext, Cell], list[CellRecord]]
) -> list[CellRecord]:
    """The cell's records from its file, or ``compute``-d and written there (atomically, with
    their checksum): the one way any executor finishes a cell, so files and resume agree."""
    path = _cell_path(context, cell)
    # one lock per cell: a concurrent run of the same study waits, then reads the file
    with FileLock(_lock(context.out, f"cell-{cell.cell_id}")):
        cached = _read_cell(path, cell.key)
        if cached is None:
            cached = compute(context, cell)
            rows = [r.model_dump(mode="json") for r in cached]
            write_json_atomic(path, {"key": cell.key, "records": rows, "sha256": _digest(rows)})
    return cached


def finished_cell(context: StudyContext, cell: Cell) -> list[CellRecord] | None:
    """The records of a cell already on disk (None: it still has to run)."""
    with FileLock(_lock(context.out, f"cell-{cell.cell_id}")):
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
