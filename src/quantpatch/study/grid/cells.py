"""The grid: what each cell crafts on, its key, and finding a cell again by its key.

A cell is (source, attack, patch size, seed). Its key hashes everything its numbers depend on
(the sources' and targets' keys, the attack's settings, the data and the code), so a cell file
or patch from other settings is never reused. Which sources an attack gets and which targets a
cell is scored on are the threat model's rules (``grid.threat``)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from quantpatch._io import content_key, load_tensors, save_tensors
from quantpatch.attacks import ATTACKS
from quantpatch.errors import ConfigError
from quantpatch.study.grid.threat import Source, adaptive_sources_for, sources_for
from quantpatch.study.settings.config import AttackSettings
from quantpatch.study.store.cache import EVAL_CODE, code_fingerprint
from quantpatch.study.zoo.context import StudyContext


@dataclass(frozen=True, eq=False)
class Cell:
    """(source, attack, patch size, seed) of one trained replicate; ``key`` hashes everything
    its numbers depend on."""

    source: Source
    attack: AttackSettings
    patch_size: int | None
    seed: int
    key: str
    replicate: int = 0

    @property
    def cell_id(self) -> str:
        size = f"p{self.patch_size}" if self.patch_size else "pixel"
        raw = f"{self.source.label}__{self.attack.label}__{size}__s{self.seed}__r{self.replicate}"
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", raw) + f"__{self.key[:8]}"


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
                        "replicate": context.replicate,
                        "code": code_fingerprint(*EVAL_CODE),
                    }
                    key = content_key(parts)
                    cells.append(Cell(source, settings, size, seed, key, context.replicate))
    return cells


def find_cell(context: StudyContext, key: str) -> Cell:
    """The cell of ``key`` (a worker given a key by its driver): refused when this code or
    data has no such cell."""
    cell = next((c for c in expand_cells(context) if c.key == key), None)
    if cell is None:
        raise ConfigError(f"no cell {key[:8]} in this study here: other code or data")
    return cell


def fit_cached(
    context: StudyContext, source: Source, settings: AttackSettings, size: int | None,
    seed: int, attack,
) -> float:  # fmt: skip
    """Fit a universal attack, reusing a cached patch learned with identical settings; returns
    the seconds spent fitting (0 from the cache).

    Keyed by what the patch depends on (not by the targets it is scored on), so the grid and
    the analyses share one patch per (sources, attack, size, seed)."""
    if not attack.universal:
        return 0.0
    parts = {
        "sources": source.keys,
        "attack": settings.model_dump(),
        "patch_size": size,
        "seed": seed,
        "data": context.data_identity(),
    }
    elapsed = 0.0

    def build(path: Path) -> None:
        nonlocal elapsed
        started = time.perf_counter()
        attack.fit(source.predictors(attack), context.dataset.train, context.device)
        elapsed = time.perf_counter() - started
        save_tensors(path, attack.state_dict(), {"source": source.label, "fit_s": elapsed})

    def load(path: Path) -> None:
        attack.load_state_dict(load_tensors(path)[0])

    context.cache.get("patches", parts, "safetensors", build=build, load=load)
    return elapsed
