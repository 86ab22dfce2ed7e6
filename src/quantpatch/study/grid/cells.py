"""Grid expansion and the work of one cell: craft adversarial images once, score every target."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import torch

from quantpatch._io import content_key, load_tensors, save_tensors
from quantpatch.attacks import ATTACKS, Attack, create_attack
from quantpatch.metrics import attack_success
from quantpatch.results import CellRecord, Timings
from quantpatch.study.cache import EVAL_CODE, code_fingerprint
from quantpatch.study.config import AttackSettings
from quantpatch.study.core import Cell, Source, StudyContext, Target
from quantpatch.study.records import cell_record, save_patch_png


def expand_cells(context: StudyContext) -> list[Cell]:
    """Seeds x attacks x sources x patch sizes, in a stable order."""
    config = context.config
    target_keys = [t.key for t in context.targets]
    cells = []
    for seed in config.seeds:
        for settings in config.attacks:
            cls = ATTACKS.get(settings.name)
            sizes = config.patch_sizes if cls.kind == "patch" else [None]
            for source in sources_for(context, cls, settings) + adaptive_sources_for(
                context, cls, settings
            ):
                for size in sizes:
                    parts = {
                        "sources": source.keys,
                        "attack": settings.model_dump(),
                        "patch_size": size,
                        "seed": seed,
                        "n_eval": config.n_eval,
                        "data": context.data_identity(),
                        "targets": target_keys,
                        "code": code_fingerprint(*EVAL_CODE),
                    }
                    cells.append(Cell(source, settings, size, seed, content_key(parts)))
    return cells


def sources_for(context: StudyContext, cls: type[Attack], settings: AttackSettings) -> list[Source]:
    """What an attack is crafted on: nothing, each architecture's precisions together, or
    every model on its own (only the precisions ``settings.sources`` names, when it does)."""
    if cls.source_free:
        return [Source.none()]
    if cls.multi_precision:
        return [Source.ensemble(arch, context.siblings(arch)) for arch in context.config.models]
    chosen = settings.sources
    if not cls.needs_gradients:  # query attacks run on any target, ONNX Runtime included
        return [
            Source.of_target(target)
            for target in context.targets
            if target.defense is None and (chosen is None or target.precision in chosen)
        ]  # (through a defence: adaptive_sources_for)
    return [
        Source.single(model)
        for model in context.models.values()
        if chosen is None or model.precision in chosen
    ]


def adaptive_sources_for(
    context: StudyContext, cls: type[Attack], settings: AttackSettings
) -> list[Source]:
    """One source per input-defended PyTorch target, the defence included (white-box through
    it): the adaptive cells. None for attacks that use no model or several (multibit), or
    that the study marks ``adaptive: false``; a forward-only defence has no such source (its
    adaptive attack is the undefended model's, already in the grid)."""
    if cls.source_free or cls.multi_precision or not settings.adaptive:
        return []
    chosen = settings.sources
    return [
        Source.single(model)
        for model in context.adaptive_sources.values()
        if chosen is None or model.precision in chosen
    ]


def scored_targets(context: StudyContext, cell: Cell) -> list[Target]:
    """Which targets a cell's images are scored on.

    An adaptive cell: only the defended target it was crafted through. Otherwise every
    undefended target, and a defended target only when the cell is its non-adaptive attack
    (crafted on the model behind the defence, on that architecture's fp32 model, or on no
    model): defended targets cost up to hundreds of forwards per image (PatchCleanser), and
    transfer from another bit-width *through* a defence answers no question the study asks."""
    source = cell.source
    if source.defense is not None:
        return [t for t in context.targets if t.name == source.label]
    return [t for t in context.targets if t.defense is None or _attacks_behind(source, t)]


def _attacks_behind(source: Source, target: Target) -> bool:
    if not source.models and source.deployed is None:
        return True  # source-free
    return source.label == target.base_name or (
        source.arch == target.arch and source.precision == "fp32"
    )


def make_attack(settings: AttackSettings, patch_size: int | None, seed: int, progress: bool):
    """The attack of ``settings`` for one patch size and seed."""
    cls = ATTACKS.get(settings.name)
    params: dict[str, Any] = {"seed": seed, "progress": progress, **settings.params}
    if cls.kind == "patch":
        params["patch_size"] = patch_size
    return create_attack(settings.name, **params)


def fit_cached(context: StudyContext, cell: Cell, attack: Attack) -> float:
    """Fit a universal attack, reusing a cached patch learned with identical settings; returns
    the seconds spent fitting (0 from the cache)."""
    if not attack.universal:
        return 0.0
    # Keyed by what the patch depends on (not by the targets it is scored on), so the grid and
    # the analyses share one patch per (sources, attack, size, seed).
    parts = {
        "sources": cell.source.keys,
        "attack": cell.attack.model_dump(),
        "patch_size": cell.patch_size,
        "seed": cell.seed,
        "data": context.data_identity(),
    }
    elapsed = 0.0

    def build(path: Path) -> None:
        nonlocal elapsed
        started = time.perf_counter()
        attack.fit(cell.source.predictors(), context.dataset.train, context.device)
        elapsed = time.perf_counter() - started
        save_tensors(path, attack.state_dict(), {"cell": cell.cell_id, "fit_s": elapsed})

    def load(path: Path) -> None:
        attack.load_state_dict(load_tensors(path)[0])

    context.cache.get("patches", parts, "safetensors", build=build, load=load)
    return elapsed


def run_cell(
    context: StudyContext, cell: Cell, *, executor: str = "local", node: str | None = None
) -> list[CellRecord]:
    """Craft the cell's adversarial images once and score them on every target; the records
    say what ran the cell, where and for how long (the input of a scaling estimate)."""
    started = time.perf_counter()
    records = _score_cell(context, cell)
    where = {"executor": executor, "node": node or socket.gethostname()}
    wall = {"wall_s": time.perf_counter() - started, **where}
    return [r.model_copy(update={"timings": r.timings.model_copy(update=wall)}) for r in records]


def _score_cell(context: StudyContext, cell: Cell) -> list[CellRecord]:
    attack = make_attack(cell.attack, cell.patch_size, cell.seed, context.progress)
    fit_s = fit_cached(context, cell, attack)
    started = time.perf_counter()
    adversarial = attack.perturb(
        cell.source.predictors(), context.eval_images, context.eval_labels, context.device
    )
    perturb_s = time.perf_counter() - started
    patch = getattr(attack, "patch", None)
    if isinstance(patch, torch.Tensor):
        save_patch_png(context.out / "patches" / f"{cell.cell_id}.png", patch)
    target_class = attack.target_class if attack.targeted else None
    records = []
    for target in scored_targets(context, cell):
        started = time.perf_counter()
        adv_pred = target.predict_labels(adversarial)
        rate = attack_success(target.clean_pred, adv_pred, context.eval_labels, target_class)
        timings = Timings(fit_s=fit_s, perturb_s=perturb_s, eval_s=time.perf_counter() - started)
        records.append(cell_record(context, cell, attack, target, rate, timings))
    return records
