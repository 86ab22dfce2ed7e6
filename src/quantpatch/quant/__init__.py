"""Quantization: ``QuantSpec``, fake-quant layers on torch's native ops, PTQ and LSQ QAT.

``quantpatch.quant.onnx`` (real int8 via ONNX Runtime) is imported on demand, so importing this
package does not import onnxruntime.
"""

from quantpatch.quant.layers import FakeQuantizer, QuantConv2d, QuantLinear, set_learnable
from quantpatch.quant.quantize import (
    CALIBRATION_METHODS,
    build_quantized,
    calibrate,
    quant_layers,
    quantizable_layers,
    quantize,
)
from quantpatch.quant.spec import FP32, QuantSpec

__all__ = [
    "CALIBRATION_METHODS",
    "FP32",
    "FakeQuantizer",
    "QuantConv2d",
    "QuantLinear",
    "QuantSpec",
    "build_quantized",
    "calibrate",
    "quant_layers",
    "quantizable_layers",
    "quantize",
    "set_learnable",
]
