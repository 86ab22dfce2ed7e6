"""ONNX Runtime's int8: static post-training QDQ of the fp32 network, and a QAT w8a8 model
exported with its learned scales."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantpatch.deployments.base import DEPLOYMENTS, Deployment, Predictor
from quantpatch.quant import QuantSpec


class _OnnxRuntime(Deployment):
    runtime = "onnxruntime"
    suffix = "onnx"
    modules = ("onnxruntime",)

    def export_fp32(self, model: nn.Module, example: torch.Tensor, path: Path) -> None:
        from quantpatch.quant.onnx import export_onnx

        export_onnx(copy.deepcopy(model).cpu(), path, example[:2])

    def load(self, path: Path) -> Predictor:
        from quantpatch.quant.onnx import OrtModel

        return OrtModel(path)


@DEPLOYMENTS.register
class OrtInt8(_OnnxRuntime):
    """ONNX Runtime static int8 (QDQ) of the fp32 network, calibrated on training images"""

    name = "ort-int8"
    kind = "ptq"

    def fingerprint(self) -> dict[str, Any]:
        from quantpatch.quant.onnx import int8_saturates

        # the int8 file depends on the CPU kind: without VNNI, ORT needs reduce_range
        return {"reduce_range": int8_saturates()}

    def spec(self, model_spec: QuantSpec) -> QuantSpec:
        from quantpatch.quant.onnx import ort_int8_spec

        return ort_int8_spec(self.fingerprint()["reduce_range"])

    def export(self, model: nn.Module, calibration: torch.Tensor, path: Path) -> None:
        from quantpatch.quant.onnx import quantize_onnx_int8

        fp32 = path.with_name(path.stem + "-fp32.onnx.tmp")
        try:
            self.export_fp32(model, calibration, fp32)
            quantize_onnx_int8(
                fp32, path, calibration, reduce_range=self.fingerprint()["reduce_range"]
            )
        finally:
            fp32.unlink(missing_ok=True)

    def simulation(
        self, model: nn.Module, calibration: torch.Tensor, device: torch.device
    ) -> nn.Module:
        from quantpatch.quant.onnx import simulate_ort_int8

        reduce_range = self.fingerprint()["reduce_range"]
        return simulate_ort_int8(model, calibration, reduce_range=reduce_range, device=device)


@DEPLOYMENTS.register
class OrtW8a8(_OnnxRuntime):
    """the QAT w8a8 model run by ONNX Runtime with its own learned scales (QDQ export)"""

    name = "ort-w8a8"
    kind = "qat-qdq"
    source = QuantSpec(8, 8)

    def fingerprint(self) -> dict[str, Any]:
        from quantpatch.quant.onnx import int8_saturates

        return {"uint8_weights": int8_saturates()}

    def export(self, model: nn.Module, calibration: torch.Tensor, path: Path) -> None:
        from quantpatch.quant.onnx import export_qdq

        uint8 = self.fingerprint()["uint8_weights"]
        export_qdq(model, path, calibration[:2], uint8_weights=uint8)

    def simulation(
        self, model: nn.Module, calibration: torch.Tensor, device: torch.device
    ) -> nn.Module:
        return model  # the trained fake-quant model is its own simulation
