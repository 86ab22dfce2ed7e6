"""PT2E graphs as differentiable fake-quant models: the matched simulation of runtimes that
quantize through ``torch.export`` (ExecuTorch's XNNPACK quantizer, NNCF for OpenVINO).

A PT2E quantizer returns the network as a ``torch.fx`` graph in which every tensor the runtime
rounds is a ``quantize_per_tensor -> dequantize_per_tensor`` pair carrying the scale and zero
point the runtime will use, and the weights are already on their integer grid (BatchNorm
folded, biases corrected where the quantizer does so). That graph *is* the runtime's
quantization, computed in float; only its rounding has no gradient. ``fake_quant_graph``
replaces each activation pair with a quantpatch ``FakeQuantizer`` holding the same scale and
zero point (straight-through gradient), so attacks get honest input gradients and the forward
pass is the runtime's arithmetic up to the integer kernels' requantization.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from quantpatch.errors import InvalidSpecError, ShapeError
from quantpatch.quant.grids import ACTIVATION_GRID, DEFAULT_WEIGHT_GRID, GRIDS, Grid
from quantpatch.quant.layers import FakeQuantizer

_QUANTIZE = "quantized_decomposed.quantize_per_tensor"
_DEQUANTIZE = "quantized_decomposed.dequantize_per_tensor"


def _example(images: torch.Tensor) -> torch.Tensor:
    """Two images (one repeated if need be): torch.export specialises a batch of one."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ShapeError(f"images must be a non-empty (N, C, H, W), got {tuple(images.shape)}")
    example = images[:2].detach().cpu().float()
    return example if len(example) == 2 else example.repeat(2, 1, 1, 1)


def export_graph(model: nn.Module, images: torch.Tensor) -> fx.GraphModule:
    """``torch.export`` of an eval-mode CPU copy of ``model`` with a dynamic batch, as the
    ``fx.GraphModule`` that PT2E quantizers take (the caller's model is left alone)."""
    model = copy.deepcopy(model).cpu().eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (_example(images),), dynamic_shapes=({0: batch},))
    return program.module()


def export_program(model: nn.Module, images: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of a (quantized) graph with a dynamic batch, for a runtime's converter."""
    batch = torch.export.Dim("batch")
    return torch.export.export(model, (_example(images),), dynamic_shapes=({0: batch},))


def _op_name(node: fx.Node) -> str:
    """``namespace.op`` of a call (``.default`` dropped: traced and exported graphs differ)."""
    if node.op != "call_function":
        return ""
    return str(node.target).removesuffix(".default")


def _grid_for(qmin: int, qmax: int) -> Grid:
    """The registered grid with as many codes as ``[qmin, qmax]`` (a zero-point shift maps
    one onto the other without changing a dequantized value)."""
    for name in (ACTIVATION_GRID, DEFAULT_WEIGHT_GRID):
        for bits in range(1, 9):
            try:
                grid = GRIDS.get(name)(bits)
            except InvalidSpecError:
                continue
            if grid.qmax - grid.qmin == qmax - qmin and not grid.shifted:
                return grid
    raise InvalidSpecError(f"no quantizer grid has the codes [{qmin}, {qmax}]")


def _fake_quantizer(scale: float, zero_point: int, qmin: int, qmax: int) -> FakeQuantizer:
    """A frozen per-tensor ``FakeQuantizer`` that rounds exactly as the runtime's q/dq pair."""
    grid = _grid_for(qmin, qmax)
    quantizer = FakeQuantizer(grid)
    with torch.no_grad():
        quantizer.scale.fill_(float(scale))
        quantizer.zero_point.fill_(float(zero_point - qmin + grid.qmin))
    quantizer.initialized = True
    return quantizer


def _constants_as_buffers(model: fx.GraphModule) -> None:
    """Plain tensor attributes (frozen weights) as buffers, so ``.to(device)`` moves them."""
    for node in model.graph.nodes:
        if node.op != "get_attr":
            continue
        owner_name, _, field = node.target.rpartition(".")
        owner = model.get_submodule(owner_name)
        value = getattr(owner, field)
        plain = isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)
        if plain and field not in owner._buffers:
            delattr(owner, field)
            owner.register_buffer(field, value)


_RELU = frozenset({"aten.relu", "aten.relu_", "aten.relu6", "aten.hardtanh"})
_RELU_FUNCTIONS = (torch.relu, nn.functional.relu, nn.functional.relu6)


def _is_relu(node: fx.Node) -> bool:
    """A ReLU call in an exported (aten) or a traced (torch function) graph."""
    return _op_name(node) in _RELU or (
        node.op == "call_function" and node.target in _RELU_FUNCTIONS
    )


def _fuse_relu_requantization(graph: fx.Graph) -> int:
    """Drop each rounding whose only reader is a ReLU that is rounded again: ``q -> dq ->
    relu -> q'`` becomes ``relu -> q'``, as a converter that fuses the ReLU into the producing
    layer keeps only the second grid (TFLite). Returns how many were dropped."""
    dropped = 0
    for node in list(graph.nodes):
        users = list(node.users)
        if _op_name(node) != _QUANTIZE or len(users) != 1 or _op_name(users[0]) != _DEQUANTIZE:
            continue
        readers = list(users[0].users)
        if len(readers) != 1 or not _is_relu(readers[0]):
            continue
        after = list(readers[0].users)
        if len(after) != 1 or _op_name(after[0]) != _QUANTIZE:
            continue
        readers[0].replace_input_with(users[0], node.args[0])
        graph.erase_node(users[0])
        graph.erase_node(node)
        dropped += 1
    return dropped


def fake_quant_graph(quantized: fx.GraphModule, *, fuse_relu: bool = False) -> fx.GraphModule:
    """A copy of a PT2E-quantized graph with each ``quantize_per_tensor`` and its
    ``dequantize_per_tensor`` users replaced by one ``FakeQuantizer`` (same scale, zero point
    and codes), in eval mode; weights stay as the quantizer froze them. ``fuse_relu``: first
    drop the rounding before a ReLU that is rounded again (``_fuse_relu_requantization``), for
    runtimes whose converter fuses it. ``InvalidSpecError`` where a quantize op is not followed
    by matching dequantize ops only."""
    graph = copy.deepcopy(quantized.graph)
    if fuse_relu:
        _fuse_relu_requantization(graph)
    model = fx.GraphModule(quantized, graph)
    for i, node in enumerate(list(model.graph.nodes)):
        if _op_name(node) != _QUANTIZE:
            continue
        source, scale, zero_point, qmin, qmax = node.args[:5]
        users = list(node.users)
        if not users or any(
            _op_name(u) != _DEQUANTIZE or tuple(u.args[1:5]) != (scale, zero_point, qmin, qmax)
            for u in users
        ):
            raise InvalidSpecError(f"{node.name}: a quantize op not followed by its dequantize")
        name = f"fake_quant_{i}"
        model.add_submodule(name, _fake_quantizer(scale, zero_point, qmin, qmax))
        with model.graph.inserting_before(node):
            replacement = model.graph.call_module(name, (source,))
        for user in users:
            user.replace_all_uses_with(replacement)
            model.graph.erase_node(user)
        model.graph.erase_node(node)
    model.graph.lint()
    model.recompile()
    _constants_as_buffers(model)
    return model.eval()
