"""Shared plumbing for the analyses: eval mode, forward hooks, layer selection, batching."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from quantpatch.errors import ShapeError, UnknownNameError


@contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Put models in eval mode for the duration and restore their training flags afterwards,
    so an analysis never leaves a model in a different state than it found it."""
    flags = [(model, model.training) for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, flag in flags:
            model.train(flag)


def _is_weight_layer(module: nn.Module) -> bool:
    # Quantized layers either subclass nn.Conv2d/nn.Linear or wrap them under a name such as
    # QuantConv2d/QuantLinear; both count, so fp32 and quantized copies yield the same names.
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return True
    return type(module).__name__.endswith(("Conv2d", "Linear"))


def _is_conv_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) or type(module).__name__.endswith("Conv2d")


def default_layers(model: nn.Module) -> list[str]:
    """Names of the outermost Conv2d/Linear modules (quantized wrappers included), in order."""
    names: list[str] = []
    for name, module in model.named_modules():
        if not name or not _is_weight_layer(module):
            continue
        if any(name.startswith(parent + ".") for parent in names):
            continue  # the inner float layer of a wrapper: its parent already stands for it
        names.append(name)
    return names


def last_conv_layer(model: nn.Module) -> str:
    """Name of the last Conv2d-like module: the usual Grad-CAM layer."""
    modules = dict(model.named_modules())
    convs = [name for name in default_layers(model) if _is_conv_layer(modules[name])]
    if not convs:
        raise ShapeError(f"{type(model).__name__} has no Conv2d layer")
    return convs[-1]


def feature_map_layer(model: nn.Module, example: torch.Tensor) -> str:
    """The Grad-CAM layer: the last module to produce a spatial map (N, C, H, W) with more
    than one position, found by one forward pass of ``example``. For a ResNet that is the last
    block's output, after the residual addition (its last conv alone misses the skip path);
    for a plain CNN the last conv or pooling map."""
    finished: list[str] = []

    def hook(name: str):
        def record(_module: nn.Module, _inputs: object, output: object) -> None:
            if (
                isinstance(output, torch.Tensor)
                and output.ndim == 4
                and output.shape[-2:].numel() > 1
            ):
                finished.append(name)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with evaluating(model), torch.inference_mode():
            model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    if not finished:
        raise ShapeError(f"{type(model).__name__} produces no spatial feature map")
    return finished[-1]


def resolve_layers(
    models: Sequence[nn.Module], layers: Sequence[str] | None
) -> tuple[list[str], bool]:
    """Layer names present in every model. Returns (names, explicit): explicit names must exist;
    default names are the first model's Conv2d/Linear layers that the others also have."""
    tables = [dict(model.named_modules()) for model in models]
    if layers is not None:
        names = list(layers)
        for table in tables:
            missing = [name for name in names if name not in table]
            if missing:
                raise UnknownNameError(f"unknown layer name(s) {missing}")
        return names, True
    names = [name for name in default_layers(models[0]) if all(name in t for t in tables[1:])]
    if not names:
        raise ShapeError("the models share no Conv2d/Linear layer names")
    return names, False


@contextmanager
def capture_outputs(
    model: nn.Module, names: Sequence[str], clone: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks that store each named module's latest output tensor in the yielded dict.

    ``clone`` copies the output so a later in-place op (``ReLU(inplace=True)``) cannot change
    it; Grad-CAM passes False because it needs the tensor that stays in the autograd graph.
    """
    table = dict(model.named_modules())
    store: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, (tuple, list)):
                output = output[0]
            if not isinstance(output, torch.Tensor):
                raise ShapeError(f"layer '{name}' does not return a tensor")
            store[name] = output.clone() if clone else output

        return hook

    handles = [table[name].register_forward_hook(make_hook(name)) for name in names]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def fired(store: Mapping[str, object], names: Sequence[str], explicit: bool) -> list[str]:
    """Names whose hooks fired. A layer never called in forward (e.g. a Linear whose weight is
    used directly) is an error when asked for by name and silently skipped by default."""
    silent = [name for name in names if name not in store]
    if silent and explicit:
        raise ShapeError(f"layer(s) {silent} were not called in the forward pass")
    return [name for name in names if name in store]


def batches(n: int, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise ShapeError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def check_images(images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    if images.ndim != 4:
        raise ShapeError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    if labels is not None and labels.shape != (images.shape[0],):
        raise ShapeError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
