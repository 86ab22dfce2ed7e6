"""The stages of a run that every executor shares: opening a study's context, preparing its
models and targets, and finishing a cell (read from its sealed file, or computed and sealed
there). The runner drives them locally; the Ray executor's tasks call the same ones, so files,
cache entries and resume behave the same wherever a stage runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from quantpatch._runtime import resolve_device, seed_everything
from quantpatch.data import Dataset, load_dataset
from quantpatch.results import CellRecord
from quantpatch.study.grid.cells import Cell
from quantpatch.study.run.checks import validate_against_data
from quantpatch.study.settings.config import StudyConfig
from quantpatch.study.store.cache import ArtifactCache
from quantpatch.study.store.run_folder import cell_path, lock_path
from quantpatch.study.store.sealed import read_sealed, settle
from quantpatch.study.zoo.context import StudyContext
from quantpatch.study.zoo.defended import prepare_defended_targets
from quantpatch.study.zoo.deployed import prepare_deployed_targets
from quantpatch.study.zoo.models import prepare_models
from quantpatch.study.zoo.targets import prepare_targets


def prepare_all(context: StudyContext) -> None:
    """Every model, then every target: the models, users' files, the deployed runtimes, then
    each of those behind every defence."""
    prepare_models(context)
    prepare_targets(context)
    prepare_deployed_targets(context)
    prepare_defended_targets(context)
    for record in context.model_records:
        context.log(f"{record.name}: clean accuracy {100 * record.clean.rate:.1f} % "
                    f"of {record.clean.n} images")  # fmt: skip


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


def settle_cell(
    context: StudyContext, cell: Cell, compute: Callable[[StudyContext, Cell], list[CellRecord]]
) -> list[CellRecord]:
    """The cell's records from its sealed file, or ``compute``-d and sealed there: the one way
    any executor finishes a cell, so files and resume agree."""
    return settle(
        "cell", cell_path(context.out, cell.cell_id), cell.key, _cell_lock(context, cell),
        parse=_records, dump=lambda rows: [r.model_dump(mode="json") for r in rows],
        compute=lambda: compute(context, cell),
    )  # fmt: skip


def finished_cell(context: StudyContext, cell: Cell) -> list[CellRecord] | None:
    """The records of a cell already on disk (None: it still has to run)."""
    with FileLock(_cell_lock(context, cell)):
        return read_sealed("cell", cell_path(context.out, cell.cell_id), cell.key, _records)


def _cell_lock(context: StudyContext, cell: Cell) -> Path:
    return lock_path(context.out, f"cell-{cell.cell_id}")


def _records(rows: list) -> list[CellRecord]:
    return [CellRecord.model_validate(row) for row in rows]
