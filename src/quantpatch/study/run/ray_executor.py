"""Run a study's models and cells as tasks on a Ray cluster (``executor: ray``).

The driver (the ``quantpatch run`` process) keeps the run's state: it submits the tasks and
writes every cell file itself through ``run.stages.settle_cell``, as the local runner does, so the
files, checksums, resume and a killed run behave the same. A task gets only the study's
settings: its worker rebuilds the data and loads models from the artifact cache, so the cache
folder and the run folder (patch images) must be one shared folder, at the same path, on every
node, and every node must run the same quantpatch code (checked: it is part of every key).

Real dependencies only: an architecture's fp32 model, then each of its quantizations and
controls (which need only the fp32 model); the cells wait for every model, because each
cell's key hashes the keys of all its targets."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from tqdm.auto import tqdm

from quantpatch.errors import ConfigError, QuantpatchError
from quantpatch.results import CellRecord
from quantpatch.study.grid.cells import Cell, find_cell
from quantpatch.study.grid.scoring import run_cell
from quantpatch.study.run.stages import finished_cell, open_context, prepare_all, settle_cell
from quantpatch.study.settings.config import StudyConfig
from quantpatch.study.store.cache import EVAL_CODE, code_fingerprint
from quantpatch.study.zoo.context import StudyContext
from quantpatch.study.zoo.models import (
    control_schedules,
    prepare_control,
    prepare_fp32,
    prepare_quantized,
    prepare_recipe,
)

TASK_RETRIES = 3
"""A task whose worker dies (killed, node lost) runs again; every file it writes is atomic."""

WORKER_CONTEXTS = 2
"""Contexts a worker process keeps (the bare one for models, the full one for cells)."""

Settings = dict[str, Any]
Report = dict[str, Any]


class RayExecutor:
    """Submits a study's tasks to the Ray cluster at ``address`` (None: start a local one)."""

    def __init__(self, address: str | None) -> None:
        self.address = address

    def build_models(self, context: StudyContext) -> None:
        self._connect()
        settings, out, replicate = task_payload(context)
        options = _task_options(context.config)
        fp32 = ray.remote(_fp32_task).options(**options)
        quantized = ray.remote(_quantized_task).options(**options)
        control = ray.remote(_control_task).options(**options)
        recipe = ray.remote(_recipe_task).options(**options)
        refs = []
        for arch in context.config.models:
            base = fp32.remote(
                settings, out, replicate, arch
            )  # its result is the others' dependency
            refs.append(base)
            if context.config.independent_source:
                refs.append(fp32.remote(settings, out, replicate, arch, independent=True))
            refs += [quantized.remote(settings, out, replicate, arch, spec.name, base)
                     for spec in context.config.precisions if not spec.is_float]  # fmt: skip
            if context.config.controls:
                refs += [control.remote(settings, out, replicate, arch, tag, base)
                         for tag in control_schedules(context)]  # fmt: skip
            refs += [recipe.remote(settings, out, replicate, arch, r.label, base)
                     for r in context.config.recipes]  # fmt: skip
        for report in _as_completed(refs):
            if context.progress:
                tqdm.write(
                    f"{report['what']} ready in {report['seconds']:.1f} s on {report['node']}"
                )

    def run_cells(self, context: StudyContext, cells: list[Cell]) -> list[CellRecord]:
        self._connect()
        settings, out, replicate = task_payload(context)
        task = ray.remote(cell_task).options(**_task_options(context.config))
        done: dict[int, list[CellRecord]] = {}
        pending: dict[Any, int] = {}
        for index, cell in enumerate(cells):
            cached = finished_cell(context, cell)
            if cached is not None:
                done[index] = cached
            else:
                pending[task.remote(settings, out, replicate, cell.key)] = index
        bar = tqdm(total=len(cells), initial=len(done), desc="cells", disable=not context.progress)
        for ref, report in _as_completed(list(pending), keep_refs=True):
            cell = cells[pending[ref]]
            rows = [CellRecord.model_validate(row) for row in report["records"]]
            done[pending[ref]] = settle_cell(context, cell, _given(rows))
            bar.update()
            bar.set_postfix_str(cell.cell_id[:60])
        bar.close()
        return [record for index in range(len(cells)) for record in done[index]]

    def _connect(self) -> None:
        if ray.is_initialized():
            return
        local = {} if self.address else {"include_dashboard": False}
        ray.init(address=self.address, logging_level=logging.WARNING, **local)


def _given(rows: list[CellRecord]) -> Callable[[StudyContext, Cell], list[CellRecord]]:
    return lambda _context, _cell: rows


def task_payload(context: StudyContext) -> tuple[Settings, str, int]:
    """What a task needs to rebuild the context: the settings, with absolute paths (a worker
    need not share the driver's working folder, only the shared filesystem)."""
    config = context.config
    paths: dict[str, Any] = {"cache_dir": config.cache_dir.resolve()}
    if config.data_root is not None:
        paths["data_root"] = config.data_root.expanduser().resolve()
    paths["weights"] = {arch: path.expanduser().resolve() for arch, path in config.weights.items()}
    paths["onnx_models"] = [
        m.model_copy(update={"path": m.path.expanduser().resolve()}) for m in config.onnx_models
    ]
    config = config.model_copy(update=paths)
    return config.model_dump(mode="json"), str(context.out.resolve()), context.replicate


def _task_options(config: StudyConfig) -> dict[str, Any]:
    """One GPU per task where the cluster has GPUs (and the study may use them), else a CPU."""
    gpus = ray.cluster_resources().get("GPU", 0)
    resources = {"num_gpus": 1} if gpus >= 1 and config.device != "cpu" else {"num_cpus": 1}
    return {**resources, "max_retries": TASK_RETRIES}


def _as_completed(refs: list, *, keep_refs: bool = False):
    """Each task's report as it finishes; a task's own error is raised as itself (a
    ConfigError stays one), after cancelling the rest; reports from other code are refused."""
    pending = list(refs)
    code = code_fingerprint(*EVAL_CODE)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            report = ray.get(ready[0])
        except ray.exceptions.RayTaskError as exc:
            for ref in pending:
                ray.cancel(ref)
            if isinstance(exc.cause, QuantpatchError):
                raise exc.cause from None
            raise
        if report["code"] != code:
            raise ConfigError(
                f"node {report['node']} runs other quantpatch code ({report['code']}, here "
                f"{code}); install the same version on every node"
            )
        yield (ready[0], report) if keep_refs else report


# -- the tasks (run in Ray workers) ------------------------------------------------------------

_CONTEXTS: dict[tuple, StudyContext] = {}


def _context(settings: Settings, out: str, replicate: int, *, full: bool) -> StudyContext:
    """This worker's context of the study, rebuilt once per worker process: data and cache
    (``full``: with every model and target, loaded from the cache)."""
    key = (repr(sorted(settings.items())), out, replicate, full)
    if key not in _CONTEXTS:
        if len(_CONTEXTS) >= WORKER_CONTEXTS:
            _CONTEXTS.clear()
        context = open_context(StudyConfig.model_validate(settings), Path(out), progress=False)
        context = context.for_replicate(replicate) if replicate else context
        if full:
            prepare_all(context)
        _CONTEXTS[key] = context
    return _CONTEXTS[key]


def _node() -> str:
    return f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:8]}"


def _report(what: str, started: float, **extra: Any) -> Report:
    seconds = time.perf_counter() - started
    code = code_fingerprint(*EVAL_CODE)
    return {"what": what, "seconds": seconds, "node": _node(), "code": code, **extra}


def _fp32_task(
    settings: Settings, out: str, replicate: int, arch: str, independent: bool = False
) -> Report:
    started = time.perf_counter()
    prepared = prepare_fp32(_context(settings, out, replicate, full=False), arch,
                            independent=independent)  # fmt: skip
    return _report(prepared.name, started)


def _quantized_task(
    settings: Settings, out: str, replicate: int, arch: str, spec: str, _base: Report
) -> Report:
    started = time.perf_counter()
    context = _context(settings, out, replicate, full=False)
    chosen = next(s for s in context.config.precisions if s.name == spec)
    prepare_quantized(context, prepare_fp32(context, arch), chosen)  # fp32: from the cache
    return _report(f"{arch}/{spec}", started)


def _control_task(
    settings: Settings, out: str, replicate: int, arch: str, tag: str, _base: Report
) -> Report:
    started = time.perf_counter()
    context = _context(settings, out, replicate, full=False)
    schedule = control_schedules(context)[tag]
    prepare_control(context, prepare_fp32(context, arch), schedule, tag)
    return _report(f"{arch}/fp32-{tag}", started)


def _recipe_task(
    settings: Settings, out: str, replicate: int, arch: str, label: str, _base: Report
) -> Report:
    started = time.perf_counter()
    context = _context(settings, out, replicate, full=False)
    chosen = next(r for r in context.config.recipes if r.label == label)
    prepare_recipe(context, prepare_fp32(context, arch), chosen)
    return _report(f"{arch}/{label}", started)


def cell_task(settings: Settings, out: str, replicate: int, key: str) -> Report:
    """The records of the cell with ``key`` (public: the scaling benchmark times it alone)."""
    started = time.perf_counter()
    context = _context(settings, out, replicate, full=True)
    try:
        cell = find_cell(context, key)
    except ConfigError as exc:
        raise ConfigError(f"node {_node()}: {exc}") from None
    records = run_cell(context, cell, executor="ray", node=_node())
    return _report(cell.cell_id, started, records=[r.model_dump(mode="json") for r in records])
