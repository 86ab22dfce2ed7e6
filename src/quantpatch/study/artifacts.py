"""Content-addressed cache of trained models, quantized models, ONNX files and patches.

A key is the hash of everything that determines the artifact, so an identical request reuses
the file and any changed setting produces a new one. Files are written atomically."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantpatch import __version__
from quantpatch._io import content_key
from quantpatch.data import Dataset
from quantpatch.models import (
    create_model,
    evaluate_accuracy,
    load_checkpoint,
    save_checkpoint,
    train_model,
)
from quantpatch.quant import QuantSpec, build_quantized, quantize
from quantpatch.study.config import StudyConfig

FORMAT_VERSION = 1


class ArtifactCache:
    """Maps key dicts to stable file paths under one root folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, kind: str, parts: dict[str, Any], suffix: str) -> Path:
        key = content_key({"format": FORMAT_VERSION, "kind": kind, **parts})
        return self.root / kind / f"{key}.{suffix}"


@dataclass
class PreparedModel:
    """A trained (and possibly quantized) PyTorch model plus what identifies it."""

    arch: str
    precision: str
    module: nn.Module
    key: str

    @property
    def name(self) -> str:
        return f"{self.arch}/{self.precision}"


def data_identity(config: StudyConfig, dataset: Dataset) -> dict[str, Any]:
    return {
        "dataset": dataset.name,
        "limit": config.limit,
        "shape": list(dataset.train.images.shape[1:]),
        "n_train": len(dataset.train),
    }


def prepare_fp32(
    arch: str,
    dataset: Dataset,
    config: StudyConfig,
    cache: ArtifactCache,
    device: torch.device,
    progress: bool = True,
) -> PreparedModel:
    """Train (or load from cache) the float model of ``arch``."""
    train_cfg = config.train_config_for(arch)
    parts = {"arch": arch, "data": data_identity(config, dataset), "train": train_cfg.model_dump()}
    path = cache.path("models", parts, "safetensors")
    torch.manual_seed(train_cfg.seed)  # initial weights depend on the seed, not on run history
    model = create_model(
        arch,
        in_channels=dataset.in_channels,
        num_classes=dataset.num_classes,
        image_size=dataset.image_size,
        mean=dataset.mean,
        std=dataset.std,
    )
    if path.exists():
        load_checkpoint(path, model)
    else:
        train_model(
            model, dataset.train, train_cfg, device, progress=progress, desc=f"train {arch}"
        )
        _save(path, model, arch, "fp32", dataset, device, train_cfg.seed)
    model.to(device).eval()
    return PreparedModel(arch, "fp32", model, path.stem)


def prepare_quantized(
    base: PreparedModel,
    spec: QuantSpec,
    dataset: Dataset,
    config: StudyConfig,
    cache: ArtifactCache,
    device: torch.device,
    progress: bool = True,
) -> PreparedModel:
    """Quantize ``base`` to ``spec`` (calibrate, then QAT when asked), cached by content."""
    if spec.is_float:
        return base
    qat = config.qat_config_for(spec.name)
    parts = {
        "base": base.key,
        "spec": [spec.weight_bits, spec.act_bits, spec.per_channel, spec.symmetric, spec.method],
        "qat": qat.model_dump() if spec.method == "qat" else None,
        "calibration": config.calibration,
        "first_last_bits": config.first_last_bits,
    }
    path = cache.path("models", parts, "safetensors")
    if path.exists():
        model = quantize(base.module, spec, first_last_bits=config.first_last_bits)
        load_checkpoint(path, model)
    else:
        model = build_quantized(
            base.module,
            spec,
            dataset.train,
            qat=qat if spec.method == "qat" else None,
            calibration=config.calibration,
            first_last_bits=config.first_last_bits,
            device=device,
            progress=progress,
        )
        _save(path, model, base.arch, spec.name, dataset, device, qat.seed)
    model.to(device).eval()
    return PreparedModel(base.arch, spec.name, model, path.stem)


def _save(
    path: Path,
    model: nn.Module,
    arch: str,
    precision: str,
    dataset: Dataset,
    device: torch.device,
    seed: int,
) -> None:
    clean = evaluate_accuracy(model, dataset.test, device)
    metadata = {
        "arch": arch,
        "dataset": dataset.name,
        "precision": precision,
        "clean_accuracy": clean.to_dict(),
        "seed": seed,
        "quantpatch_version": __version__,
        "torch_version": torch.__version__,
    }
    save_checkpoint(path, model, metadata)
