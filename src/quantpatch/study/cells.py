"""Grid expansion and the work of one cell: craft adversarial images once, score every target."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from quantpatch._io import content_key, load_tensors, save_tensors
from quantpatch.attacks import ATTACKS, Attack, create_attack
from quantpatch.metrics import attack_success
from quantpatch.study.artifacts import PreparedModel, data_identity
from quantpatch.study.config import AttackSettings
from quantpatch.study.records import base_record, save_patch_png

if TYPE_CHECKING:
    from quantpatch.study.runner import StudyContext


@dataclass(frozen=True)
class Cell:
    """(source, attack, patch size, seed); ``key`` hashes everything its numbers depend on."""

    source: str
    source_models: tuple[str, ...]
    attack: AttackSettings
    patch_size: int | None
    seed: int
    key: str

    @property
    def cell_id(self) -> str:
        size = f"p{self.patch_size}" if self.patch_size else "pixel"
        raw = f"{self.source}__{self.attack.label}__{size}__s{self.seed}"
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", raw) + f"__{self.key[:8]}"


def expand_cells(context: StudyContext) -> list[Cell]:
    """Seeds x attacks x patch sizes x sources, in a stable order."""
    config = context.config
    cells = []
    target_keys = [t.key for t in context.targets]
    for seed in config.seeds:
        for settings in config.attacks:
            cls = ATTACKS.get(settings.name)
            sizes = config.patch_sizes if cls.kind == "patch" else [None]
            for source, members in _sources(context, cls):
                for size in sizes:
                    parts = {
                        "sources": [context.models[m].key for m in members],
                        "attack": settings.model_dump(),
                        "patch_size": size,
                        "seed": seed,
                        "n_eval": config.n_eval,
                        "data": data_identity(config, context.dataset),
                        "targets": target_keys,
                    }
                    cells.append(Cell(source, members, settings, size, seed, content_key(parts)))
    return cells


def _sources(context: StudyContext, cls: type[Attack]) -> list[tuple[str, tuple[str, ...]]]:
    if getattr(cls, "source_free", False):
        return [("none", ())]
    if getattr(cls, "multi_precision", False):
        return [
            (f"{arch}/multibit", tuple(m.name for m in context.siblings(arch)))
            for arch in context.config.models
        ]
    return [(name, (name,)) for name in context.models]


def make_attack(cell: Cell, progress: bool = True) -> Attack:
    cls = ATTACKS.get(cell.attack.name)
    params: dict[str, Any] = {"seed": cell.seed, "progress": progress, **cell.attack.params}
    if cls.kind == "patch":
        params["patch_size"] = cell.patch_size
    return create_attack(cell.attack.name, **params)


def fit_cached(
    context: StudyContext, cell: Cell, attack: Attack, sources: list[PreparedModel]
) -> float:
    """Fit a universal attack, reusing a cached patch learned with identical settings."""
    if not attack.universal:
        return 0.0
    # Keyed by what the patch depends on (not by the targets it is scored on), so the grid and
    # the analyses share one patch per (sources, attack, size, seed).
    parts = {
        "sources": [source.key for source in sources],
        "attack": cell.attack.model_dump(),
        "patch_size": cell.patch_size,
        "seed": cell.seed,
        "data": data_identity(context.config, context.dataset),
    }
    path = context.cache.path("patches", parts, "safetensors")
    if path.exists():
        tensors, _ = load_tensors(path)
        attack.load_state_dict(tensors)
        return 0.0
    started = time.perf_counter()
    attack.fit([source.module for source in sources], context.dataset.train, context.device)
    elapsed = time.perf_counter() - started
    save_tensors(path, attack.state_dict(), {"cell": cell.cell_id, "fit_s": elapsed})
    return elapsed


def run_cell(context: StudyContext, cell: Cell) -> list[dict[str, Any]]:
    attack = make_attack(cell, context.progress)
    sources = [context.models[name] for name in cell.source_models]
    models = [source.module for source in sources]
    fit_s = fit_cached(context, cell, attack, sources)
    started = time.perf_counter()
    adversarial = attack.perturb(models, context.eval_images, context.eval_labels, context.device)
    perturb_s = time.perf_counter() - started
    patch = getattr(attack, "patch", None)
    if isinstance(patch, torch.Tensor):
        save_patch_png(context.out / "patches" / f"{cell.cell_id}.png", patch)
    target_class = getattr(attack, "target_class", None) if attack.targeted else None
    records = []
    for target in context.targets:
        started = time.perf_counter()
        adv_pred = target.predict_labels(adversarial)
        rate = attack_success(target.clean_pred, adv_pred, context.eval_labels, target_class)
        record = base_record(context, cell, attack, target)
        record.update(rate.to_dict())
        record["timings"] = {
            "fit_s": fit_s,
            "perturb_s": perturb_s,
            "eval_s": time.perf_counter() - started,
        }
        records.append(record)
    return records
