"""The files a run leaves: results.json and results.csv, from typed records, with the
versions that produced them."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

from quantpatch import __version__
from quantpatch._io import write_json_atomic, write_text_atomic
from quantpatch.models import training_numerics
from quantpatch.results import Analyses, CellRecord, ModelRecord, ResultsFile, cells_to_csv
from quantpatch.study.zoo.context import StudyContext


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


def write_results(
    context: StudyContext, models: list[ModelRecord], cells: list[CellRecord], analyses: Analyses
) -> Path:
    """Write results.json and results.csv from typed records; returns results.json's path."""
    results = ResultsFile(
        study=context.config.name,
        dataset=context.dataset.name,
        config=context.config.model_dump(mode="json"),
        versions=versions(),
        training_numerics=training_numerics(context.device),
        device=str(context.device),
        models=models,
        cells=cells,
        analyses=analyses,
    )
    path = context.out / "results.json"
    write_json_atomic(path, results.model_dump(mode="json"))
    write_text_atomic(context.out / "results.csv", cells_to_csv(cells))
    return path
