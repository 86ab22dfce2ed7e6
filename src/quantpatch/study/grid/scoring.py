"""Result records of a run (RobustBench style: one per cell x target) and the files they go to.

The record types are the results contract in ``quantpatch.results``; this module only fills
them from a run's context and writes results.json and results.csv."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from quantpatch import __version__
from quantpatch._io import atomic_path, write_json_atomic, write_text_atomic
from quantpatch.attacks import Attack
from quantpatch.metrics import Rate
from quantpatch.results import (
    Analyses,
    CellRecord,
    CurvePoint,
    RateRecord,
    ResultsFile,
    Timings,
    cells_to_csv,
)
from quantpatch.study.core import Cell, StudyContext, Target


def versions() -> dict[str, str]:
    import onnxruntime
    import torchvision

    return {
        "quantpatch": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": str(os.cpu_count()),
    }


def cell_record(
    context: StudyContext, cell: Cell, attack: Attack, target: Target, rate: Rate, timings: Timings
) -> CellRecord:
    """One cell scored on one target."""
    height, width = context.eval_images.shape[-2:]
    size = cell.patch_size
    threat, adaptive = _threat(cell, attack, target), is_adaptive(cell, attack, target)
    return CellRecord(
        **RateRecord.of(rate).model_dump(),
        study=context.config.name,
        dataset=context.dataset.name,
        cell=cell.cell_id,
        source=cell.source.label,
        source_arch=cell.source.arch,
        source_precision=cell.source.precision,
        target=target.name,
        target_arch=target.arch,
        target_precision=target.precision,
        defense=target.defense,
        white_box=threat in ("white-box", "query-only"),
        threat=threat,
        mean_queries=_mean_queries(attack),
        adaptive=adaptive,
        adaptive_via=_adaptive_via(attack, target) if adaptive else None,
        attack=cell.attack.label,
        attack_name=cell.attack.name,
        attack_kind=attack.kind,
        targeted=attack.targeted,
        target_class=attack.target_class if attack.targeted else None,
        patch_size=size,
        patch_area=size * size / (height * width) if size else None,
        seed=cell.seed,
        target_clean_accuracy=context.model_record(target.name).clean.rate,
        timings=timings,
        fit_curve=fit_curve_record(attack),
        patch_location=attack.searched_location,
    )


def fit_curve_record(attack: Attack) -> list[CurvePoint] | None:
    """The attack's fit curve (fitted now or loaded from the patch cache), None without one."""
    if not attack.fit_curve:
        return None
    return [CurvePoint(step=p.step, loss=p.loss, success=p.success) for p in attack.fit_curve]


def is_adaptive(cell: Cell, attack: Attack, target: Target) -> bool:
    """Crafted knowing the target's defence: through it, or (forward-only defence, gradient
    attack) on the model behind it. A query attack on the model behind a forward-only
    defence never queried the defence, so it is not adaptive."""
    if target.defense is None:
        return False
    if target.adaptive_via == "underlying-model" and attack.needs_gradients:
        return cell.source.label == target.base_name
    return cell.source.label == target.name


def _adaptive_via(attack: Attack, target: Target) -> str | None:
    """How an adaptive attack saw the defence: a query attack only through its outputs."""
    return target.adaptive_via if attack.needs_gradients else "queries"


def _threat(cell: Cell, attack: Attack, target: Target) -> str:
    if not cell.source.models and cell.source.deployed is None:
        return "source-free"
    if cell.source.label == target.name or is_adaptive(cell, attack, target):
        return "white-box" if attack.needs_gradients else "query-only"
    if target.defense is not None:
        return "transfer"  # crafted without the defence: non-adaptive
    if target.model is not None and target.model in cell.source.models:
        return "white-box ensemble"
    return "transfer"


def _mean_queries(attack: Attack) -> float | None:
    """Queries per image of a query attack's last run (its ``queries_used``), else None."""
    used = getattr(attack, "queries_used", None)
    if isinstance(used, torch.Tensor) and used.numel():
        return float(used.float().mean())
    return None


def save_patch_png(path: Path, patch: torch.Tensor, upscale: int = 8) -> None:
    """Save a (C, p, p) patch in [0, 1] as an upscaled PNG (nearest neighbour, crisp pixels)."""
    array = (patch.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round()
    array = np.repeat(np.repeat(array.astype(np.uint8), upscale, 0), upscale, 1)
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write_results(context: StudyContext, cells: list[CellRecord], analyses: Analyses) -> Path:
    """Write results.json and results.csv from typed records; returns results.json's path."""
    results = ResultsFile(
        study=context.config.name,
        dataset=context.dataset.name,
        config=context.config.model_dump(mode="json"),
        versions=versions(),
        device=str(context.device),
        models=context.model_records,
        cells=cells,
        analyses=analyses,
    )
    path = context.out / "results.json"
    write_json_atomic(path, results.model_dump(mode="json"))
    write_text_atomic(context.out / "results.csv", cells_to_csv(cells))
    return path
