"""LiteRT (TFLite) full-integer int8: PT2E static quantization of the fp32 network by
LiteRT-Torch's quantizer, converted to a ``.tflite`` flatbuffer and run by ``ai-edge-litert``'s
interpreter (its XNNPACK delegate on CPU).

The quantizer is ``litert_torch.quantize.pt2e_quantizer.PT2EQuantizer`` with
``get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)``, LiteRT-Torch's
documented static int8 recipe: int8 weights per channel on ``[-127, 127]``, int8 activations
per tensor with a zero point from a histogram observer, BatchNorm folded, int8 logits (which
``LiteRtModel`` dequantizes). The converter fuses each ReLU into the layer before it and keeps
only the ReLU's output grid, so the simulation is the converted PT2E graph with that rounding
dropped (``fake_quant_graph(..., fuse_relu=True)``); it differs from TFLite only by the integer
kernels' requantization (fixed-point multipliers, int32 biases).

LiteRT-Torch converts static shapes only, so the flatbuffer holds one signature per batch size
in ``BATCH_SIZES`` (``batch_<n>``) and ``LiteRtModel`` covers any batch with the fewest calls.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from quantpatch._io import atomic_path
from quantpatch.deployments.base import DEPLOYMENTS, Deployment, Predictor, import_quietly
from quantpatch.errors import CorruptFileError, DataNotFoundError, ShapeError
from quantpatch.quant import QuantSpec

CALIBRATION_BATCH = 64
BATCH_SIZES = (64, 8, 1)
"""The static batch sizes of an exported model, largest first (a batch is split greedily)."""
_SIGNATURE = "batch_{}"
_PROGRESS = "LITERT_TORCH_SHOW_PROGRESS"


def _quantizer() -> Any:
    from litert_torch.quantize.pt2e_quantizer import (
        PT2EQuantizer,
        get_symmetric_quantization_config,
    )

    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    return PT2EQuantizer().set_global(config)


def litert_quantize(model: nn.Module, calibration: torch.Tensor) -> fx.GraphModule:
    """The PT2E int8 graph of ``model`` by LiteRT-Torch's quantizer, its observers run on
    ``calibration`` in batches of ``CALIBRATION_BATCH``: the graph LiteRT converts and, made
    differentiable, its simulation."""
    import_quietly("torchao")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from quantpatch.quant.pt2e import export_graph

    prepared = prepare_pt2e(export_graph(model, calibration), _quantizer())
    images = calibration.detach().cpu().float()
    with torch.no_grad():
        for start in range(0, len(images), CALIBRATION_BATCH):
            prepared(images[start : start + CALIBRATION_BATCH])
    return convert_pt2e(prepared, fold_quantize=False)


@contextlib.contextmanager
def _quiet_converter() -> Iterator[None]:
    """LiteRT-Torch prints dozens of progress lines per conversion unless told not to (by an
    environment variable, restored afterwards)."""
    previous = os.environ.get(_PROGRESS)
    os.environ[_PROGRESS] = "n"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_PROGRESS, None)
        else:
            os.environ[_PROGRESS] = previous


def _convert(model: nn.Module, example: torch.Tensor, path: Path, *, quantized: bool) -> None:
    """Write ``model`` (float, or PT2E-quantized by ``litert_quantize``) as a ``.tflite`` with
    one static signature per batch size."""
    import litert_torch
    from litert_torch.quantize.quant_config import QuantConfig

    image = example[:1].detach().cpu().float()
    converter = litert_torch.Converter()
    for size in BATCH_SIZES:
        batch = (image.expand(size, -1, -1, -1).clone(),)
        converter.add_signature(_SIGNATURE.format(size), model, batch)
    config = QuantConfig(pt2e_quantizer=_quantizer()) if quantized else None
    with _quiet_converter(), atomic_path(path) as tmp:
        converter.convert(quant_config=config).export(str(tmp))


class LiteRtModel:
    """A LiteRT interpreter as a callable: float images (N, C, H, W) -> float torch logits
    (int8 outputs dequantized with their own scale and zero point), each batch split into calls
    of the model's static signatures (largest first), with as many threads as torch uses."""

    own_thread_pool = True  # query attacks keep their own tensor work off its cores

    def __init__(self, path: str | Path) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        if not self.path.is_file():
            raise DataNotFoundError(f"LiteRT model not found: {self.path}")
        try:
            self._interpreter = Interpreter(
                model_path=str(self.path), num_threads=torch.get_num_threads()
            )
            names = self._interpreter.get_signature_list()
            sizes = sorted((int(n.removeprefix("batch_")) for n in names), reverse=True)
            self.runners = {
                s: self._interpreter.get_signature_runner(_SIGNATURE.format(s)) for s in sizes
            }
        except Exception as exc:  # noqa: BLE001 - the interpreter raises plain RuntimeErrors
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CorruptFileError(f"cannot load LiteRT model {self.path}: {msg}") from None
        if 1 not in self.runners:
            raise CorruptFileError(f"LiteRT model {self.path} has no batch-1 signature")

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(self.runners)

    def _run(self, size: int, chunk: np.ndarray) -> np.ndarray:
        runner = self.runners[size]
        (input_name,) = runner.get_input_details()
        (output_name, output), *_ = runner.get_output_details().items()
        result = runner(**{input_name: chunk})[output_name]
        scale, zero_point = output["quantization"]
        if np.issubdtype(result.dtype, np.integer):
            return (result.astype(np.float32) - zero_point) * np.float32(scale)
        return np.array(result, dtype=np.float32, copy=True)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[0] == 0:
            raise ShapeError(f"images must be a non-empty (N, C, H, W), got {tuple(images.shape)}")
        array = images.detach().cpu().float().contiguous().numpy()
        outputs, start = [], 0
        while start < len(array):
            size = next(s for s in self.runners if s <= len(array) - start)
            outputs.append(self._run(size, array[start : start + size]))
            start += size
        return torch.from_numpy(np.concatenate(outputs))

    def __repr__(self) -> str:
        return f"LiteRtModel({str(self.path)!r})"


@DEPLOYMENTS.register
class LiteRtInt8(Deployment):
    """LiteRT (TFLite) full-integer int8 of the fp32 network (PT2E), calibrated on training images

    Quantized by LiteRT-Torch's ``PT2EQuantizer``, run by the ``ai-edge-litert`` interpreter."""

    name = "litert-int8"
    runtime = "litert"
    kind = "ptq"
    suffix = "tflite"
    modules = ("litert_torch", "ai_edge_litert", "torchao")
    extra = "litert"

    def fingerprint(self) -> dict[str, Any]:
        packages = ("litert-torch", "ai-edge-litert", "litert-converter", "torchao")
        return {**{p: metadata.version(p) for p in packages}, "batch_sizes": list(BATCH_SIZES)}

    def spec(self, model_spec: QuantSpec) -> QuantSpec:
        return QuantSpec(8, 8, method="ptq")  # int8 per-channel symmetric weights, 8-bit acts

    def export(self, model: nn.Module, calibration: torch.Tensor, path: Path) -> None:
        quantized = litert_quantize(model, calibration)
        _convert(quantized, calibration, Path(path), quantized=True)

    def export_fp32(self, model: nn.Module, example: torch.Tensor, path: Path) -> None:
        _convert(copy.deepcopy(model).cpu().eval(), example, Path(path), quantized=False)

    def load(self, path: Path) -> Predictor:
        return LiteRtModel(path)

    def simulation(
        self, model: nn.Module, calibration: torch.Tensor, device: torch.device
    ) -> nn.Module:
        from quantpatch.quant.pt2e import fake_quant_graph

        quantized = litert_quantize(model, calibration)
        return fake_quant_graph(quantized, fuse_relu=True).to(device)
