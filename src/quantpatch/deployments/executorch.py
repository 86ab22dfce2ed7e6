"""ExecuTorch's XNNPACK int8: PT2E static quantization of the fp32 network by the XNNPACK
quantizer, lowered to the XNNPACK delegate and run by ExecuTorch's Python runtime.

The quantizer is ``XNNPACKQuantizer`` with ``get_symmetric_quantization_config(is_per_channel=
True)``, ExecuTorch's documented int8 recipe: int8 weights per channel on ``[-127, 127]``,
int8 activations per tensor with a zero point from a histogram observer, BatchNorm folded, the
outputs of convolutions (with their ReLU), adds, pools and linears requantized. Its simulation
is the converted PT2E graph with differentiable fake-quant
(``quantpatch.quant.pt2e.fake_quant_graph``); it differs from XNNPACK only by the integer
kernels' requantization (int32 bias, fixed-point output rounding).

A dynamic batch does not survive XNNPACK's lowering here (ExecuTorch 1.5.1, torch 2.14): its
channels-last pass records a guard (batch < 16) that the memory planner then takes as the
input's bound, so any call with more than 15 images fails. The program therefore holds one
static method per batch size in ``BATCH_SIZES`` (``batch_<n>``), and ``ExecuTorchModel``
covers any batch with the fewest calls of those sizes, as on a device.
"""

from __future__ import annotations

import copy
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from quantpatch._io import atomic_path
from quantpatch.deployments.base import (
    DEPLOYMENTS,
    Deployment,
    Predictor,
    import_quietly,
    native_stderr_silenced,
)
from quantpatch.errors import CorruptFileError, DataNotFoundError, ShapeError
from quantpatch.quant import QuantSpec

CALIBRATION_BATCH = 64
BATCH_SIZES = (64, 8, 1)
"""The static batch sizes of an exported program, largest first (a batch is split greedily)."""
_METHOD = "batch_{}"


def xnnpack_quantize(model: nn.Module, calibration: torch.Tensor) -> fx.GraphModule:
    """The PT2E int8 graph of ``model`` by the XNNPACK quantizer, its observers run on
    ``calibration`` in batches of ``CALIBRATION_BATCH``: the graph ExecuTorch lowers and,
    made differentiable, its simulation."""
    import_quietly("torchao")
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from quantpatch.quant.pt2e import export_graph

    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True)
    )
    prepared = prepare_pt2e(export_graph(model, calibration), quantizer)
    images = calibration.detach().cpu().float()
    with torch.no_grad():
        for start in range(0, len(images), CALIBRATION_BATCH):
            prepared(images[start : start + CALIBRATION_BATCH])
    return convert_pt2e(prepared)


def _lower(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Write ``model`` (float or PT2E-quantized) as an ExecuTorch program with XNNPACK
    delegates, one static method per batch size."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    image = example[:1].detach().cpu().float()
    programs = {
        _METHOD.format(size): torch.export.export(model, (image.expand(size, -1, -1, -1).clone(),))
        for size in BATCH_SIZES
    }
    program = to_edge_transform_and_lower(
        programs,
        partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
    ).to_executorch()
    with atomic_path(path) as tmp:
        tmp.write_bytes(program.buffer)


def _match_torch_threads() -> None:
    """XNNPACK's thread pool (one per process) as wide as torch's, so timings compare fairly
    with the PyTorch and ONNX Runtime models; resized only between calls."""
    from executorch.extension.pybindings import portable_lib

    with native_stderr_silenced():  # the pool's first start probes the CPU, aloud
        if portable_lib._threadpool_get_thread_count() != torch.get_num_threads():
            portable_lib._unsafe_reset_threadpool(torch.get_num_threads())


class ExecuTorchModel:
    """An ExecuTorch program as a callable: float images (N, C, H, W) -> torch logits, each
    batch split into calls of the program's static batch sizes (largest first)."""

    own_thread_pool = True  # query attacks keep their own tensor work off its cores

    def __init__(self, path: str | Path) -> None:
        import_quietly("torchao")
        from executorch.runtime import Runtime

        _match_torch_threads()

        self.path = Path(path)
        if not self.path.is_file():
            raise DataNotFoundError(f"ExecuTorch program not found: {self.path}")
        try:
            program = Runtime.get().load_program(self.path)
            sizes = sorted(
                (int(name.removeprefix("batch_")) for name in program.method_names), reverse=True
            )
            self.methods = {size: program.load_method(_METHOD.format(size)) for size in sizes}
        except Exception as exc:  # noqa: BLE001 - the runtime raises its own pybind types
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CorruptFileError(f"cannot load ExecuTorch program {self.path}: {msg}") from None
        if 1 not in self.methods:
            raise CorruptFileError(f"ExecuTorch program {self.path} has no batch-1 method")
        self._program = program  # the methods need it alive

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(self.methods)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[0] == 0:
            raise ShapeError(f"images must be a non-empty (N, C, H, W), got {tuple(images.shape)}")
        images = images.detach().cpu().float().contiguous()
        outputs, start = [], 0
        while start < len(images):
            size = next(s for s in self.methods if s <= len(images) - start)
            chunk = images[start : start + size]
            outputs.append(self.methods[size].execute([chunk])[0].clone())
            start += size
        return torch.cat(outputs)

    def __repr__(self) -> str:
        return f"ExecuTorchModel({str(self.path)!r})"


@DEPLOYMENTS.register
class ExecuTorchInt8(Deployment):
    """ExecuTorch XNNPACK int8 of the fp32 network (PT2E), calibrated on training images

    Quantized by ``XNNPACKQuantizer``, lowered to the XNNPACK delegate, run by ExecuTorch."""

    name = "executorch-int8"
    runtime = "executorch"
    kind = "ptq"
    suffix = "pte"
    modules = ("executorch", "torchao")
    extra = "executorch"

    def fingerprint(self) -> dict[str, Any]:
        versions = {p: metadata.version(p) for p in ("executorch", "torchao")}
        return {**versions, "batch_sizes": list(BATCH_SIZES)}

    def spec(self, model_spec: QuantSpec) -> QuantSpec:
        return QuantSpec(8, 8, method="ptq")  # int8 per-channel symmetric weights, 8-bit acts

    def export(self, model: nn.Module, calibration: torch.Tensor, path: Path) -> None:
        _lower(xnnpack_quantize(model, calibration), calibration, Path(path))

    def export_fp32(self, model: nn.Module, example: torch.Tensor, path: Path) -> None:
        _lower(copy.deepcopy(model).cpu().eval(), example, Path(path))

    def load(self, path: Path) -> Predictor:
        return ExecuTorchModel(path)

    def simulation(
        self, model: nn.Module, calibration: torch.Tensor, device: torch.device
    ) -> nn.Module:
        from quantpatch.quant.pt2e import fake_quant_graph

        return fake_quant_graph(xnnpack_quantize(model, calibration)).to(device)
