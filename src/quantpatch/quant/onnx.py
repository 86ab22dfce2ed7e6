"""Real int8 deployment on ONNX Runtime (CPU), and the check that the simulation predicts it.

Two deployments of one network:

* ``quantize_onnx_int8``: ORT's own static int8 quantization of the exported fp32 network
  (post-training, QDQ). ``simulate_ort_int8`` builds the fake-quant model that reproduces it
  from the same calibration images with ORT's rules, and ``compare_int8`` tells whether that
  simulation predicts ORT's outputs better than the fp32 network does (the null).
* ``export_qdq``: a trained fake-quant model (e.g. QAT ``w8a8``) exported with its own
  learned scales and zero points as QuantizeLinear/DequantizeLinear pairs, so ORT runs the
  model as trained; ``compare_int8`` then checks it against the fake-quant model itself.

``OrtModel.kernels`` says how many conv/gemm/matmul nodes ORT actually runs on integer
kernels. The fp32 network is part of every check: a simulation is only worth its name where it
predicts deployment better than the float network does.
"""

from __future__ import annotations

import copy
import functools
import operator
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from quantpatch._io import atomic_path
from quantpatch._runtime import resolve_device
from quantpatch.errors import CorruptFileError, DataNotFoundError, InvalidSpecError, ShapeError
from quantpatch.metrics import Rate, accuracy
from quantpatch.quant.calibration import calibrate
from quantpatch.quant.grids import ACTIVATION_GRID, DEFAULT_WEIGHT_GRID, GRIDS
from quantpatch.quant.layers import (
    QUANT_LAYERS,
    FakeQuantizer,
    QuantMultiheadAttention,
    quant_layers,
)
from quantpatch.quant.quantize import quantizable_layers, quantize
from quantpatch.quant.spec import QuantSpec

Predictor = Callable[[torch.Tensor], torch.Tensor]
"""Anything that maps images (N, C, H, W) to logits: a model, an ``OrtModel``."""

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
OPSET = 17
CALIBRATION_BATCH = 64
WARMUP_IMAGES = 64


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
    of products in saturating int16: ORT then advises ``reduce_range`` (weight codes
    ``[-64, 64]``). On resnet20/mnist5k that lifts ORT int8 from 91.4 % to 93.8 % top-1 and
    its agreement with the fp32 model from 93.6 % to 99.2 %. False where it cannot tell (non-Linux) or on ARM.

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
    ``reduce_range=None`` (default) therefore narrows the weights to ``[-64, 64]`` exactly
    where that happens (``int8_saturates()``); pass a bool to force either.
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
    compare fairly with the PyTorch models on the same machine, and with spinning threads off,
    so the torch work between calls gets the cores.
    """

    own_thread_pool = True  # query attacks keep their own tensor work off its cores

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
        # ORT's workers busy-wait after each run by default, holding the cores that the torch
        # work between queries (an attack's proposals, pastes, scores) needs: on 2 cores that
        # halved Sparse-RS's queries/s (benchmarks/query_speed.py)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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

    def kernels(self) -> dict[str, int]:
        """How many conv/gemm/matmul nodes ORT runs on integer kernels (``"int8"``:
        QLinearConv, QGemm, ...) and how many in float (``"float"``: Conv, Gemm, ... on
        dequantized values), read from the graph ORT optimises (QDQ fusion happens there)."""
        import onnx
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.log_severity_level = 3
        with tempfile.TemporaryDirectory(prefix="quantpatch-ort-") as work:
            options.optimized_model_filepath = str(Path(work) / "optimized.onnx")
            ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            ops = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
        return {
            "int8": sum(op in _INTEGER_OPS for op in ops),
            "float": sum(op in _FLOAT_OPS for op in ops),
        }


_INTEGER_OPS = frozenset(
    {"QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger",
     "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention"}
)  # fmt: skip
_FLOAT_OPS = frozenset({"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"})


# -- graph rewrites shared by the simulation and the QDQ export -----------------------------------


class _LayerTracer(fx.Tracer):
    """torch.fx tracer that keeps quantized layers whole, so conv -> BN pairs stay visible."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        leaf = isinstance(module, (*QUANT_LAYERS, QuantMultiheadAttention))
        return leaf or super().is_leaf_module(module, qualified_name)


def _traced(model: nn.Module) -> fx.GraphModule:
    try:
        graph = _LayerTracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many types for untraceable code
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidSpecError(
            f"torch.fx cannot trace {type(model).__name__} ({msg}); deploying it needs its graph"
        ) from None
    return fx.GraphModule(model, graph)


def _is(node: fx.Node, modules: dict[str, nn.Module], types: tuple, functions: tuple = ()) -> bool:
    """Whether ``node`` calls a module of one of ``types`` or one of ``functions``."""
    if node.op == "call_module":
        return isinstance(modules[node.target], types)
    return node.op == "call_function" and node.target in functions


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> bool:
    """Fold eval-mode ``bn`` into ``conv``; False (nothing changed) where that is not exact.

    A quantized conv folds when its weights are per-channel with zero point 0 on a grid
    symmetric about 0: scaling a channel's weight and scale by ``|gamma / sigma|`` keeps its
    integer codes (a negative factor flips their signs)."""
    if bn.running_var is None or bn.running_mean is None:
        return False  # batch statistics at inference: not an affine map
    quant = getattr(conv, "weight_quant", None)
    if quant is not None and not (
        quant.per_channel
        and not bool(quant.zero_point.any())
        and quant.grid.qmin == -quant.grid.qmax
    ):
        return False
    factor = torch.rsqrt(bn.running_var + bn.eps)
    shift = torch.zeros_like(factor)
    if bn.affine:
        factor, shift = factor * bn.weight, bn.bias
    bias = conv.bias if conv.bias is not None else torch.zeros_like(factor)
    conv.weight.mul_(factor.view(-1, 1, 1, 1))
    conv.bias = nn.Parameter((bias - bn.running_mean) * factor + shift)
    if quant is not None:
        quant.scale.mul_(factor.abs())
    return True


def fold_batchnorm(model: nn.Module) -> fx.GraphModule:
    """An eval-mode, torch.fx-traced copy of ``model`` with each BatchNorm2d folded into the
    conv that feeds only it, as ONNX Runtime does before it quantizes (so per-channel weight
    ranges are those of the folded weights); other BatchNorms stay. ``InvalidSpecError``
    where torch.fx cannot trace the model."""
    folded = _traced(copy.deepcopy(model).eval())
    modules = dict(folded.named_modules())
    for node in list(folded.graph.nodes):
        source = node.args[0] if node.args else None
        if (
            _is(node, modules, (nn.BatchNorm2d,))
            and isinstance(source, fx.Node)
            and _is(source, modules, (nn.Conv2d,))
            and len(source.users) == 1
            and _fold(modules[source.target], modules[node.target])
        ):
            node.replace_all_uses_with(source)
            folded.graph.erase_node(node)
    folded.delete_all_unused_submodules()
    folded.recompile()
    return folded.eval()


# -- the matched simulation of ORT static int8 ----------------------------------------------------

_ORT_OUTPUTS = (*QUANT_LAYERS, nn.AdaptiveAvgPool2d, nn.AvgPool2d)
_ORT_OUTPUT_FUNCTIONS = (operator.add, torch.add, nn.functional.adaptive_avg_pool2d)
_RELUS = (nn.ReLU, nn.ReLU6)
_RELU_FUNCTIONS = (torch.relu, nn.functional.relu, nn.functional.relu6)


def _quantize_outputs(model: fx.GraphModule) -> None:
    """Add an 8-bit activation quantizer wherever ORT rounds a tensor that our layers (which
    quantize their inputs) leave in float: the output of every conv/linear (so the logits and
    a conv's output before a residual add), residual add and average pool; after its ReLU
    where that is its only user, as ORT folds the ReLU into the quantized range. Where the
    tensor then enters a quantized layer the two quantizers see the same range and the second
    changes nothing."""
    modules = dict(model.named_modules())
    for i, node in enumerate(list(model.graph.nodes)):
        if not _is(node, modules, _ORT_OUTPUTS, _ORT_OUTPUT_FUNCTIONS):
            continue
        users = list(node.users)
        if len(users) == 1 and _is(users[0], modules, _RELUS, _RELU_FUNCTIONS):
            node = users[0]
        name = f"ort_output_{i}"
        model.add_submodule(name, FakeQuantizer(GRIDS.get(ACTIVATION_GRID)(8)))
        with model.graph.inserting_after(node):
            quantized = model.graph.call_module(name, (node,))
        node.replace_all_uses_with(quantized, delete_user_cb=lambda u, q=quantized: u is not q)
    model.recompile()


@torch.no_grad()
def _round_biases(model: nn.Module) -> None:
    """Biases on ORT's int32 grid, scale ``input scale * weight scale`` per output channel."""
    for _, layer in quant_layers(model):
        if layer.bias is not None:
            step = layer.act_quant.scale * layer.weight_quant.scale
            layer.bias.copy_(torch.round(layer.bias / step) * step)


def ort_int8_spec(reduce_range: bool) -> QuantSpec:
    """ORT static int8 as a spec: 8-bit per-channel weights (with ``reduce_range``, ORT's
    ``[-64, 64]`` codes: the ``reduced`` grid), 8-bit activations, post-training."""
    grid = "reduced" if reduce_range else DEFAULT_WEIGHT_GRID
    return QuantSpec(8, 8, method="ptq", weight_grid=grid)


def simulate_ort_int8(
    fp32_model: nn.Module,
    calib_images: torch.Tensor,
    *,
    reduce_range: bool,
    device: torch.device | str = "auto",
) -> fx.GraphModule:
    """The fake-quant model that reproduces ``quantize_onnx_int8(..., calib_images,
    reduce_range=reduce_range)`` on this network, by ORT's rules:

    * BatchNorm folded into the convs first (``fold_batchnorm``);
    * every conv/linear layer at 8 bit, first and last included; weights per channel,
      symmetric, zero point 0, ``s = max|w| / 127`` on codes ``[-127, 127]`` (``reduce_range``:
      ``max|w| / 64`` on ``[-64, 64]``); biases rounded to int32 steps of ``s_in * s_w``;
    * activations per tensor, uint8 ``[0, 255]`` with a zero point, from the min/max (widened
      to include 0) of the float network on ``calib_images`` (``float-minmax``), at each
      conv/linear input and wherever else ORT quantizes (``_quantize_outputs``).

    Reproduced exactly for the CNNs of the zoo (conv, linear, ReLU, max/average pool,
    residual add); ORT quantizes further ops (e.g. the matmuls inside attention) that this
    simulation leaves in float.
    """
    device = resolve_device(device)
    _check_images(calib_images)
    simulation = quantize(fold_batchnorm(fp32_model), ort_int8_spec(reduce_range)).to(device)
    _quantize_outputs(simulation)
    calibrate(simulation, calib_images, "float-minmax", device, batch_size=CALIBRATION_BATCH)
    _round_biases(simulation)
    return simulation.eval()


# -- the QAT model as trained, as a QDQ graph -----------------------------------------------------


class _OnnxQDQ(nn.Module):
    """Export form of one 8-bit ``FakeQuantizer``: the same scale, on an integer range the
    ONNX exporter maps to QuantizeLinear/DequantizeLinear (int8 or uint8); codes and zero point
    moved by ``shift`` (128: int8 codes as uint8), which leaves the dequantized values alone."""

    def __init__(self, quantizer: FakeQuantizer, qmin: int, qmax: int, shift: int = 0) -> None:
        super().__init__()
        scale, zero_point = quantizer.scale.detach(), quantizer.zero_point.detach() + shift
        if not quantizer.per_channel:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        self.register_buffer("scale", scale.float().clone())
        self.register_buffer("zero_point", zero_point.round().int())
        self.axis, self.per_channel, self.qmin, self.qmax = (
            quantizer.axis, quantizer.per_channel, qmin, qmax
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(
                x, self.scale, self.zero_point, self.axis, self.qmin, self.qmax
            )
        return torch.fake_quantize_per_tensor_affine(
            x, self.scale, self.zero_point, self.qmin, self.qmax
        )


def _int8_deployable(layer: nn.Module) -> bool:
    """8-bit weights with zero point 0 on int8 codes, and 8-bit uint8 activations."""
    weight, act = layer.weight_quant, layer.act_quant
    return (
        weight is not None
        and act is not None
        and weight.bits == act.bits == 8
        and not bool(weight.zero_point.any())
        and weight.grid.qmin >= -128
        and weight.grid.qmax <= 127
        and (act.grid.qmin, act.grid.qmax) == (0, 255)
    )


def _check_int8_deployable(qmodel: nn.Module) -> None:
    layers = list(quant_layers(qmodel))
    bad = [name for name, layer in layers if not _int8_deployable(layer)]
    bad += [f"{name} (float)" for name in quantizable_layers(qmodel)]
    if not layers or bad:
        spec = getattr(qmodel, "quant_spec", None)
        listed = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise InvalidSpecError(
            f"cannot deploy {spec or type(qmodel).__name__} on ORT int8 kernels: every "
            "conv/linear layer needs 8-bit weights (zero point 0) and 8-bit activations; "
            f"not {listed or 'a single quantized layer'}"
        )


def export_qdq(
    qmodel: nn.Module,
    path: str | os.PathLike,
    example: torch.Tensor,
    *,
    uint8_weights: bool | None = None,
) -> Path:
    """Export a fake-quant model with its own (e.g. LSQ-learned) scales and zero points as a
    QDQ ONNX graph: a QuantizeLinear/DequantizeLinear pair wherever a fake-quant op sits
    (per-channel weights, uint8 per-tensor activations); atomic write to ``path``.

    Only models that are 8-bit everywhere deploy this way (``InvalidSpecError`` otherwise,
    e.g. for ``w4a4``). ONNX knows int8 as ``[-128, 127]``; our weight codes stay within
    ``[-127, 127]``, so the weights are exported already quantized and the wider range changes
    nothing. The learned 8-bit weight codes cannot be narrowed like ``reduce_range``, so where
    ORT's u8 x s8 kernels saturate (``int8_saturates()``, the default of ``uint8_weights``)
    the same codes go out as uint8 with zero point 128, for ORT's u8 x u8 kernels, which do
    not saturate. BatchNorm is folded into per-channel quantized convs (exact: the codes are
    kept, the scales absorb ``gamma / sigma``) so ORT can fuse them into integer kernels. ORT
    runs a conv/linear on integer kernels where a quantized tensor follows it
    (``OrtModel.kernels``); elsewhere (e.g. the logits layer, convs feeding a residual add) it
    computes in float on the dequantized weights and inputs, as the fake-quant model does.
    """
    _check_images(example)
    _check_int8_deployable(qmodel)
    uint8_weights = int8_saturates() if uint8_weights is None else uint8_weights
    weight_range = (0, 255, 128) if uint8_weights else (-128, 127, 0)
    model = copy.deepcopy(qmodel).cpu().eval()
    with torch.no_grad():
        for _, layer in quant_layers(model):
            layer.weight.copy_(layer.quantized_weight())
    model = fold_batchnorm(model)
    for _, layer in quant_layers(model):
        layer.weight_quant = _OnnxQDQ(layer.weight_quant, *weight_range)
        layer.act_quant = _OnnxQDQ(layer.act_quant, 0, 255)
    path = Path(path)
    with atomic_path(path) as tmp:
        _export_torchscript(model, example.detach().cpu().float(), tmp)
    return path


# -- the deployment check -------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    """ORT int8 against one reference model on one set of images.

    ``top1``: images where both predict the same class; ``logit_error``: mean over images of
    ``||logits_ort - logits_ref||_2 / ||logits_ref||_2``; ``reference_accuracy``: the
    reference's own top-1 accuracy."""

    top1: Rate
    logit_error: float
    reference_accuracy: Rate


@dataclass(frozen=True)
class InputCheck:
    """ORT int8 on one kind of input (clean or adversarial) against the simulation that
    should predict it and against the fp32 network (the null)."""

    int8_accuracy: Rate
    simulation: Match
    fp32: Match

    @property
    def simulation_closer(self) -> bool:
        """Whether the simulation predicts ORT int8's logits better than fp32 does."""
        return self.simulation.logit_error < self.fp32.logit_error


@dataclass(frozen=True)
class Int8Check:
    """``compare_int8``'s answer: the clean (and adversarial) comparison, and the speeds."""

    clean: InputCheck
    adversarial: InputCheck | None
    int8_img_per_s: float
    fp32_img_per_s: float
    patched: InputCheck | None = None

    @property
    def speedup_vs_fp32(self) -> float:
        return self.int8_img_per_s / self.fp32_img_per_s


def _logits(model: Predictor, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    from quantpatch.models import predict_logits

    return predict_logits(model, images, device)


def _timed(
    model: Predictor, images: torch.Tensor, device: torch.device, repeats: int
) -> tuple[torch.Tensor, float]:
    """Logits plus throughput (img/s): best of ``repeats`` full passes after a warm-up batch."""
    _check_images(images)
    _logits(model, images[:WARMUP_IMAGES], device)
    best, logits = float("inf"), None
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        logits = _logits(model, images, device)
        best = min(best, time.perf_counter() - start)
    assert logits is not None
    return logits, len(images) / max(best, 1e-9)


def throughput(
    model: Predictor, images: torch.Tensor, repeats: int = 3, device: torch.device | str = "cpu"
) -> float:
    """Images per second of ``model`` over ``images`` (best of ``repeats`` full passes)."""
    return _timed(model, images, resolve_device(device), repeats)[1]


def _match(ort: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor) -> Match:
    error = (ort - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12)
    ref_pred = ref.argmax(dim=1)
    return Match(
        top1=Rate(int((ort.argmax(dim=1) == ref_pred).sum()), len(labels)),
        logit_error=float(error.mean()),
        reference_accuracy=accuracy(ref_pred, labels),
    )


def _input_check(
    logits: tuple[torch.Tensor, torch.Tensor, torch.Tensor], labels: torch.Tensor
) -> InputCheck:
    int8, simulation, fp32 = logits
    return InputCheck(
        int8_accuracy=accuracy(int8.argmax(dim=1), labels),
        simulation=_match(int8, simulation, labels),
        fp32=_match(int8, fp32, labels),
    )


def compare_int8(
    int8: Predictor,
    simulation: Predictor,
    fp32: Predictor,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    adversarial: torch.Tensor | None = None,
    patched: torch.Tensor | None = None,
    device: torch.device | str = "auto",
    repeats: int = 3,
) -> Int8Check:
    """Does the simulation predict what ORT int8 computes, better than the fp32 network does?

    ``int8`` is the deployed model (an ``OrtModel``), ``simulation`` the fake-quant model that
    should reproduce it (``simulate_ort_int8`` for ORT's static int8, the trained model itself
    for ``export_qdq``) and ``fp32`` the float network, the null: a simulation is only worth
    its name where it beats fp32's agreement. Each is run on ``images`` (and on the
    ``adversarial`` and ``patched`` versions of the same images, labelled by ``labels``:
    pixel perturbations near the decision boundary, and patches, whose saturated pixels test
    the activation ranges the runtime clips to). Throughputs are
    those of ``int8`` and ``fp32`` (best of ``repeats`` passes over ``images``); pass the ORT
    fp32 session as ``fp32`` (the same function as the PyTorch model to ~1e-5) to compare
    like with like.
    """
    _check_images(images)
    labels = labels.cpu()
    if labels.shape != (len(images),):
        raise ShapeError(f"{len(images)} images but labels of shape {tuple(labels.shape)}")
    for what, batch in (("adversarial", adversarial), ("patched", patched)):
        if batch is not None and batch.shape != images.shape:
            raise ShapeError(
                f"{what} images {tuple(batch.shape)} differ from {tuple(images.shape)}"
            )
    device = resolve_device(device)
    int8_logits, int8_speed = _timed(int8, images, device, repeats)
    fp32_logits, fp32_speed = _timed(fp32, images, device, repeats)
    clean = _input_check((int8_logits, _logits(simulation, images, device), fp32_logits), labels)

    def check_on(batch: torch.Tensor | None) -> InputCheck | None:
        if batch is None:
            return None
        logits = tuple(_logits(m, batch, device) for m in (int8, simulation, fp32))
        return _input_check(logits, labels)

    return Int8Check(clean, check_on(adversarial), int8_speed, fp32_speed, check_on(patched))
