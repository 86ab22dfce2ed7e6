"""Real int8 deployment check: ONNX export, ONNX Runtime static int8 quantization, inference.

The fake-quant models simulate integer arithmetic; this module runs the same float network as
true int8 kernels (ORT CPU, QDQ format, per-channel int8 weights, uint8 activations calibrated on
training images) so a study can report how closely the simulation matches deployment.
"""

from __future__ import annotations

import copy
import functools
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from quantpatch._io import atomic_path
from quantpatch._runtime import resolve_device
from quantpatch.errors import CorruptFileError, DataNotFoundError, ShapeError
from quantpatch.metrics import Rate, accuracy

if TYPE_CHECKING:
    from quantpatch.data import Split

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
OPSET = 17
CALIBRATION_BATCH = 64


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[0] == 0:
        raise ShapeError(f"images must be a non-empty (N, C, H, W), got {tuple(images.shape)}")


def export_onnx(model: nn.Module, path: str | os.PathLike, example: torch.Tensor) -> Path:
    """Export ``model`` (float, on CPU) to ONNX with a dynamic batch axis; atomic write.

    Uses the TorchScript exporter, which handles these CNNs reliably and in seconds; the
    torch.export-based exporter (slower by an order of magnitude here) is the fallback.
    ``example`` is a small batch of images, e.g. ``images[:2]``.
    """
    _check_images(example)
    path = Path(path)
    model = copy.deepcopy(model).cpu().eval()  # the caller's model keeps its device and mode
    example = example.detach().cpu().float()
    with atomic_path(path) as tmp:
        try:
            _export_torchscript(model, example, tmp)
        except Exception:  # noqa: BLE001 - any failure of the legacy path: try dynamo
            _export_dynamo(model, example, tmp)
    return path


def _export_torchscript(model: nn.Module, example: torch.Tensor, out: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice of the legacy exporter
        torch.onnx.export(
            model,
            (example,),
            str(out),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
        )


def _export_dynamo(model: nn.Module, example: torch.Tensor, out: Path) -> None:
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    program.save(str(out))


def _load_onnx(path: str | os.PathLike) -> Any:
    """Read and check an ONNX file; ``DataNotFoundError``/``CorruptFileError`` on failure."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - protobuf/onnx raise many unrelated types
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CorruptFileError(f"cannot read ONNX file {path}: {msg}") from None
    return model


def _calibration_reader(input_name: str, images: torch.Tensor, batch_size: int) -> Any:
    """An ORT ``CalibrationDataReader`` over float images in fixed-size batches."""
    from onnxruntime.quantization import CalibrationDataReader

    data = images.detach().cpu().float().contiguous().numpy()

    class ImageReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

        def rewind(self) -> None:
            self._batches = iter(
                {input_name: data[s : s + batch_size]} for s in range(0, len(data), batch_size)
            )

    return ImageReader()


@functools.cache
def int8_saturates(machine: str | None = None, cpuinfo: str | None = None) -> bool:
    """True on x86 CPUs without VNNI, where ORT's uint8 x int8 kernels (VPMADDUBSW) add pairs
    of products in saturating int16: ORT then advises 7-bit weights (``reduce_range``). On
    resnet20/mnist5k that lifts ORT int8 from 91.4 % to 93.8 % top-1 and its agreement with
    the fp32 model from 93.6 % to 99.2 %. False where it cannot tell (non-Linux) or on ARM.

    ``machine`` and ``cpuinfo`` default to this machine's (``platform.machine()``,
    ``/proc/cpuinfo``); the answer is cached, as the CPU does not change under a process.
    """
    machine = platform.machine() if machine is None else machine
    if machine.lower() not in {"x86_64", "amd64", "i386", "i686"}:
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return "avx512_vnni" not in cpuinfo and "avx_vnni" not in cpuinfo


def quantize_onnx_int8(
    fp32_onnx: str | os.PathLike,
    out_path: str | os.PathLike,
    calib_images: torch.Tensor,
    per_channel: bool = True,
    *,
    reduce_range: bool | None = None,
) -> Path:
    """Static int8 quantization with ORT: QDQ format, int8 (per-channel) weights, uint8
    activations from min/max calibration on ``calib_images``; atomic write to ``out_path``.

    The graph is first pre-processed (shape inference + ORT graph optimisation, which folds
    BatchNorm into the convolutions) as ORT recommends. On x86 CPUs without VNNI, ORT's
    uint8 x int8 kernels (VPMADDUBSW) can saturate int16 sums of products of large codes;
    ``reduce_range=None`` (default) therefore uses 7-bit weights exactly where that happens
    (``int8_saturates()``); pass a bool to force either.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _check_images(calib_images)
    model = _load_onnx(fp32_onnx)
    input_name = model.graph.input[0].name
    reader = _calibration_reader(input_name, calib_images, CALIBRATION_BATCH)
    out_path = Path(out_path)
    with (
        tempfile.TemporaryDirectory(prefix="quantpatch-ort-") as work,
        atomic_path(out_path) as tmp,
    ):
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(model, prepared)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(
                str(prepared),
                str(tmp),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                reduce_range=int8_saturates() if reduce_range is None else reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
    return out_path


class OrtModel:
    """An ONNX Runtime CPU session as a callable: float images (N, C, H, W) -> torch logits.

    Runs in batches of ``batch_size`` with as many intra-op threads as torch uses, so timings
    compare fairly with the PyTorch models on the same machine.
    """

    def __init__(self, path: str | os.PathLike, batch_size: int = 512) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise DataNotFoundError(f"ONNX file not found: {self.path}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # noqa: BLE001 - ORT raises its own pybind error types
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CorruptFileError(f"cannot load ONNX model {self.path}: {msg}") from None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        array = images.detach().cpu().float().contiguous().numpy()
        outputs = [
            self.session.run(None, {self.input_name: array[s : s + self.batch_size]})[0]
            for s in range(0, len(array), self.batch_size)
        ]
        return torch.from_numpy(np.concatenate(outputs))

    def __repr__(self) -> str:
        return f"OrtModel({str(self.path)!r}, batch_size={self.batch_size})"


def _timed(model: OrtModel, images: torch.Tensor, repeats: int) -> tuple[torch.Tensor, float]:
    """Logits plus throughput (img/s): best of ``repeats`` full passes after a warm-up batch."""
    _check_images(images)
    model(images[: min(len(images), model.batch_size)])
    best, logits = float("inf"), None
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        logits = model(images)
        best = min(best, time.perf_counter() - start)
    assert logits is not None
    return logits, len(images) / max(best, 1e-9)


def throughput(model: OrtModel, images: torch.Tensor, repeats: int = 3) -> float:
    """Images per second of ``model`` over ``images`` (best of ``repeats`` full passes)."""
    return _timed(model, images, repeats)[1]


def compare_int8(
    int8: OrtModel,
    sim_model: nn.Module,
    split: Split,
    device: torch.device | str = "auto",
    *,
    fp32: OrtModel | None = None,
    repeats: int = 3,
) -> dict[str, Any]:
    """How well the simulated w8a8 model predicts real int8 deployment, and what int8 buys.

    Returns ``ort_int8_accuracy``, ``sim_accuracy``, ``agreement`` (top-1 of ORT int8 vs the
    simulation; all ``Rate``) and ``int8_img_per_s``; with the ORT ``fp32`` session also
    ``ort_fp32_accuracy``, ``fp32_img_per_s`` and ``speedup_vs_fp32`` (int8 / fp32 img/s).
    Speeds are the best of ``repeats`` full passes over ``split``.
    """
    from quantpatch.models import predict_logits

    device = resolve_device(device)
    labels = split.labels.cpu()
    int8_logits, int8_speed = _timed(int8, split.images, repeats)
    int8_pred = int8_logits.argmax(dim=1)
    sim_pred = predict_logits(sim_model, split.images, device).argmax(dim=1)
    result: dict[str, Any] = {
        "ort_int8_accuracy": accuracy(int8_pred, labels),
        "sim_accuracy": accuracy(sim_pred, labels),
        "agreement": Rate(int((int8_pred == sim_pred).sum()), len(labels)),
        "int8_img_per_s": int8_speed,
    }
    if fp32 is not None:
        fp32_logits, fp32_speed = _timed(fp32, split.images, repeats)
        result["ort_fp32_accuracy"] = accuracy(fp32_logits.argmax(dim=1), labels)
        result["fp32_img_per_s"] = fp32_speed
        result["speedup_vs_fp32"] = int8_speed / fp32_speed
    return result
