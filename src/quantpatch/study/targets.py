"""Targets: anything a patch is evaluated on (PyTorch models and the ONNX Runtime int8 model)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from quantpatch.models import predict_logits
from quantpatch.study.artifacts import ArtifactCache, PreparedModel

Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Target:
    """A named model that maps images to logits; ``model`` is None for non-PyTorch runtimes."""

    arch: str
    precision: str
    predict: Predictor
    key: str
    model: PreparedModel | None = None
    clean_pred: torch.Tensor | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"{self.arch}/{self.precision}"

    def predict_labels(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict(images).argmax(dim=1)


def torch_target(prepared: PreparedModel, device: torch.device) -> Target:
    def predict(images: torch.Tensor) -> torch.Tensor:
        return predict_logits(prepared.module, images, device)

    return Target(prepared.arch, prepared.precision, predict, prepared.key, prepared)


def ort_int8_target(
    base: PreparedModel, calib_images: torch.Tensor, cache: ArtifactCache
) -> tuple[Target, object, object]:
    """Export ``base`` to ONNX, quantize it to int8 with ORT static QDQ, and wrap it.

    Returns the target plus the fp32 and int8 ``OrtModel``s (for the deployment check)."""
    from quantpatch.quant.onnx import OrtModel, export_onnx, int8_saturates, quantize_onnx_int8

    reduce_range = int8_saturates()  # part of the key: the int8 file depends on the CPU kind
    parts = {"base": base.key, "n_calib": int(calib_images.shape[0])}
    fp32_path = cache.path("onnx", {**parts, "precision": "fp32"}, "onnx")
    int8_path = cache.path(
        "onnx", {**parts, "precision": "int8", "reduce_range": reduce_range}, "onnx"
    )
    if not fp32_path.exists():
        export_onnx(copy.deepcopy(base.module).cpu(), fp32_path, calib_images[:2])
    if not int8_path.exists():
        quantize_onnx_int8(fp32_path, int8_path, calib_images, reduce_range=reduce_range)
    fp32_model, int8_model = OrtModel(fp32_path), OrtModel(int8_path)
    target = Target(base.arch, "ort-int8", int8_model, int8_path.stem)
    return target, fp32_model, int8_model
