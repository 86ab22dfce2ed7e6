"""OpenVINO's int8 on CPU: NNCF post-training quantization of the fp32 network, and a QAT
w8a8 model read from its QDQ export with its learned scales.

``openvino-int8`` quantizes the ``torch.export`` graph of the fp32 network with NNCF's default
post-training recipe (``nncf.quantize``: OpenVINO's symmetric int8 scheme, min/max statistics
on the calibration images, fast bias correction), converts the quantized graph to OpenVINO
(``ov.convert_model``) and runs it on the CPU plugin, which executes its convolutions and
matmuls on u8/i8 kernels (``OpenVinoModel.kernels``). Its simulation is that same NNCF graph
with differentiable fake-quant (``quantpatch.quant.pt2e.fake_quant_graph``).

An artifact is one file: a zip holding the OpenVINO IR (``model.xml`` and ``model.bin``),
weights kept in fp32, so a study's cache can treat it like an ONNX file.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import zipfile
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
_XML, _BIN = "model.xml", "model.bin"
_COMPUTE_LAYERS = frozenset({"Convolution", "GroupConvolution", "FullyConnected", "MatMul"})
_INTEGER = frozenset({"u8", "i8"})


def _save_ir(model: Any, path: Path) -> None:
    """Write an ``ov.Model`` as one zip of its IR (fp32 weights: no fp16 compression)."""
    import openvino as ov

    with (
        tempfile.TemporaryDirectory(prefix="quantpatch-ov-") as work,
        atomic_path(path) as tmp,
    ):
        xml = Path(work) / _XML
        ov.save_model(model, xml, compress_to_fp16=False)
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
            archive.write(xml, _XML)
            archive.write(xml.with_suffix(".bin"), _BIN)


def _read_ir(path: Path) -> Any:
    import openvino as ov

    if not path.is_file():
        raise DataNotFoundError(f"OpenVINO model not found: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            xml, weights = archive.read(_XML), archive.read(_BIN)
        return ov.Core().read_model(xml, weights)
    except Exception as exc:  # noqa: BLE001 - zipfile and OpenVINO raise many types
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CorruptFileError(f"cannot read OpenVINO model {path}: {msg}") from None


def _convert(model: nn.Module | fx.GraphModule, images: torch.Tensor) -> Any:
    """The OpenVINO model of a torch network (float or NNCF-quantized), dynamic batch."""
    import openvino as ov

    from quantpatch.quant.pt2e import export_program

    return ov.convert_model(export_program(model, images))


class OpenVinoModel:
    """An OpenVINO CPU compiled model as a callable: float images (N, C, H, W) -> torch logits.

    Compiled with as many inference threads as torch uses and fp32 as the precision of its
    float parts (OpenVINO would otherwise pick bf16 on CPUs that have it), run in batches of
    ``batch_size``."""

    own_thread_pool = True  # query attacks keep their own tensor work off its cores

    def __init__(self, path: str | Path, batch_size: int = 512) -> None:
        import openvino as ov

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path = Path(path)
        self.batch_size = batch_size
        config = {
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            "INFERENCE_PRECISION_HINT": "f32",
        }
        self.compiled = ov.Core().compile_model(_read_ir(self.path), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[0] == 0:
            raise ShapeError(f"images must be a non-empty (N, C, H, W), got {tuple(images.shape)}")
        array = images.detach().cpu().float().contiguous().numpy()
        outputs = []
        for start in range(0, len(array), self.batch_size):
            result = self.request.infer([array[start : start + self.batch_size]])
            outputs.append(np.array(result[0], copy=True))
        return torch.from_numpy(np.concatenate(outputs))

    def __repr__(self) -> str:
        return f"OpenVinoModel({str(self.path)!r}, batch_size={self.batch_size})"

    def kernels(self) -> dict[str, int]:
        """How many convolution/matmul layers the CPU plugin runs on integer (u8/i8) kernels
        and how many in float, read from the compiled (runtime) graph."""
        counts = {"int8": 0, "float": 0}
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if "layerType" not in info or info["layerType"].astype(str) not in _COMPUTE_LAYERS:
                continue
            integer = info["runtimePrecision"].astype(str) in _INTEGER
            counts["int8" if integer else "float"] += 1
        return counts


def _versions(*packages: str) -> dict[str, str]:
    return {package: metadata.version(package) for package in packages}


def nncf_quantize(model: nn.Module, calibration: torch.Tensor) -> fx.GraphModule:
    """NNCF's default post-training int8 of ``model``'s ``torch.export`` graph, with
    statistics from ``calibration`` in batches of ``CALIBRATION_BATCH``: the graph OpenVINO
    deploys and, made differentiable, its simulation."""
    import_quietly("torchao")  # NNCF's FX backend imports it
    import nncf

    from quantpatch.quant.pt2e import export_graph

    graph = export_graph(model, calibration)
    images = calibration.detach().cpu().float()
    batches = [images[s : s + CALIBRATION_BATCH] for s in range(0, len(images), CALIBRATION_BATCH)]
    nncf_log = logging.getLogger("nncf")
    nncf_log.addFilter(_known_fx_notice)
    try:  # subset_size counts dataset items, i.e. batches: every one is used
        return nncf.quantize(graph, nncf.Dataset(batches), subset_size=len(batches))
    finally:
        nncf_log.removeFilter(_known_fx_notice)


def _known_fx_notice(record: logging.LogRecord) -> bool:
    """Drop NNCF's notice that its Torch FX backend is experimental: quantpatch uses it on
    purpose (the same graph is the simulation) and checks its agreement with OpenVINO; it
    would otherwise print once per exported model."""
    return "Experimental Torch FX quantization backend" not in record.getMessage()


class _OpenVino(Deployment):
    runtime = "openvino"
    suffix = "ovir"
    modules = ("openvino",)
    extra = "openvino"

    def export_fp32(self, model: nn.Module, example: torch.Tensor, path: Path) -> None:
        _save_ir(_convert(copy.deepcopy(model).cpu().eval(), example), Path(path))

    def load(self, path: Path) -> Predictor:
        return OpenVinoModel(path)


@DEPLOYMENTS.register
class OpenVinoInt8(_OpenVino):
    """OpenVINO CPU int8 of the fp32 network, NNCF post-training, calibrated on training images

    ``nncf.quantize`` of the ``torch.export`` graph, converted by ``ov.convert_model``."""

    name = "openvino-int8"
    kind = "ptq"
    modules = ("openvino", "nncf")

    def fingerprint(self) -> dict[str, Any]:
        return _versions("openvino", "nncf")

    def spec(self, model_spec: QuantSpec) -> QuantSpec:
        return QuantSpec(8, 8, method="ptq")  # int8 per-channel symmetric weights, 8-bit acts

    def export(self, model: nn.Module, calibration: torch.Tensor, path: Path) -> None:
        _save_ir(_convert(nncf_quantize(model, calibration), calibration), Path(path))

    def simulation(
        self, model: nn.Module, calibration: torch.Tensor, device: torch.device
    ) -> nn.Module:
        from quantpatch.quant.pt2e import fake_quant_graph

        return fake_quant_graph(nncf_quantize(model, calibration)).to(device)


@DEPLOYMENTS.register
class OpenVinoW8a8(_OpenVino):
    """the QAT w8a8 model run by OpenVINO CPU with its own learned scales (QDQ export)

    ``export_qdq``'s ONNX graph (int8 weights) read by OpenVINO, which fuses it to int8."""

    name = "openvino-w8a8"
    kind = "qat-qdq"
    source = QuantSpec(8, 8)
    modules = ("openvino", "onnx")

    def fingerprint(self) -> dict[str, Any]:
        return _versions("openvino")

    def export(self, model: nn.Module, calibration: torch.Tensor, path: Path) -> None:
        import openvino as ov

        from quantpatch.quant.onnx import export_qdq

        with tempfile.TemporaryDirectory(prefix="quantpatch-ov-") as work:
            qdq = Path(work) / "qdq.onnx"
            export_qdq(model, qdq, calibration[:2], uint8_weights=False)
            _save_ir(ov.convert_model(qdq), Path(path))

    def simulation(
        self, model: nn.Module, calibration: torch.Tensor, device: torch.device
    ) -> nn.Module:
        return model  # the trained fake-quant model is its own simulation
