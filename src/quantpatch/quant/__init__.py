"""Quantization: ``QuantSpec``, fake-quant layers on torch's native ops, PTQ and LSQ QAT.

Integer grids (``GRIDS``) and calibration methods (``CALIBRATIONS``) are registries: a new
quantizer or calibration method is one registered class. ``quantpatch.quant.onnx`` (real int8
via ONNX Runtime) is imported on demand, so importing this package does not import
onnxruntime.
"""

from quantpatch.quant.calibration import CALIBRATIONS, Calibration, Observation, calibrate
from quantpatch.quant.grids import GRIDS, Grid
from quantpatch.quant.layers import (
    FakeQuantizer,
    QuantConv2d,
    QuantLinear,
    QuantMultiheadAttention,
    freeze_weights,
    quant_layers,
    set_learnable,
)
from quantpatch.quant.quantize import build_quantized, quantizable_layers, quantize
from quantpatch.quant.spec import FP32, QuantizerSpec, QuantSpec

__all__ = [
    "CALIBRATIONS",
    "FP32",
    "GRIDS",
    "Calibration",
    "FakeQuantizer",
    "Grid",
    "Observation",
    "QuantConv2d",
    "QuantLinear",
    "QuantMultiheadAttention",
    "QuantSpec",
    "QuantizerSpec",
    "build_quantized",
    "calibrate",
    "freeze_weights",
    "quant_layers",
    "quantizable_layers",
    "quantize",
    "set_learnable",
]
