"""Result records (one per cell x target, RobustBench style) and the files they live in."""

from __future__ import annotations

import csv
import io
import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from quantpatch import __version__
from quantpatch._io import atomic_path, write_json_atomic, write_text_atomic
from quantpatch.metrics import accuracy

if TYPE_CHECKING:
    from quantpatch.attacks import Attack
    from quantpatch.study.cells import Cell
    from quantpatch.study.runner import StudyContext
    from quantpatch.study.targets import Target

CSV_COLUMNS = [
    "study", "dataset", "source", "target", "white_box", "attack", "attack_kind", "targeted",
    "target_class", "patch_size", "patch_area", "seed", "n", "successes", "rate", "ci_low",
    "ci_high", "target_clean_accuracy", "fit_s", "perturb_s", "eval_s",
]  # fmt: skip


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


def model_record(context: StudyContext, target: Target, labels: torch.Tensor) -> dict[str, Any]:
    return {
        "name": target.name,
        "arch": target.arch,
        "precision": target.precision,
        "key": target.key,
        "clean": accuracy(target.clean_pred, labels).to_dict(),
    }


def base_record(context: StudyContext, cell: Cell, attack: Attack, target: Target) -> dict:
    image_area = context.eval_images.shape[-1] * context.eval_images.shape[-2]
    clean = next(r for r in context.model_records if r["name"] == target.name)["clean"]
    return {
        "study": context.config.name,
        "dataset": context.dataset.name,
        "cell": cell.cell_id,
        "source": cell.source,
        "source_arch": cell.source.split("/")[0],
        "source_precision": cell.source.split("/")[-1],
        "target": target.name,
        "target_arch": target.arch,
        "target_precision": target.precision,
        "white_box": cell.source == target.name,
        "attack": cell.attack.label,
        "attack_name": cell.attack.name,
        "attack_kind": attack.kind,
        "targeted": bool(attack.targeted),
        "target_class": getattr(attack, "target_class", None) if attack.targeted else None,
        "patch_size": cell.patch_size,
        "patch_area": (cell.patch_size**2 / image_area) if cell.patch_size else None,
        "seed": cell.seed,
        "target_clean_accuracy": clean["rate"],
    }


def save_patch_png(path: Path, patch: torch.Tensor, upscale: int = 8) -> None:
    """Save a (C, p, p) patch in [0, 1] as an upscaled PNG (nearest neighbour, crisp pixels)."""
    array = (patch.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round()
    array = np.repeat(np.repeat(array.astype(np.uint8), upscale, 0), upscale, 1)
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write_results(
    context: StudyContext, records: list[dict[str, Any]], analyses: dict[str, Any]
) -> Path:
    """Write results.json + results.csv, then render the report from them."""
    from quantpatch.report import build_report

    results = {
        "study": context.config.name,
        "dataset": context.dataset.name,
        "config": context.config.model_dump(mode="json"),
        "versions": versions(),
        "device": str(context.device),
        "models": context.model_records,
        "cells": records,
        "analyses": analyses,
    }
    path = context.out / "results.json"
    write_json_atomic(path, results)
    write_text_atomic(context.out / "results.csv", records_to_csv(records))
    build_report(context.out)
    return path


def records_to_csv(records: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for record in records:
        writer.writerow({**record, **record.get("timings", {}), "n": record["n"]})
    return buffer.getvalue()
