"""``quantize`` (module swap) and ``build_quantized`` (quantize, calibrate, LSQ QAT)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from quantpatch._runtime import resolve_device
from quantpatch.errors import InvalidSpecError
from quantpatch.quant.calibration import calibrate
from quantpatch.quant.grids import check_bits
from quantpatch.quant.layers import (
    QUANT_LAYERS,
    FakeQuantizer,
    QuantConv2d,
    QuantLinear,
    QuantMultiheadAttention,
    set_learnable,
)
from quantpatch.quant.spec import QuantizerSpec, QuantSpec

if TYPE_CHECKING:
    from quantpatch.data import Split
    from quantpatch.models import TrainConfig

CALIBRATION_IMAGES = 1024

DEFAULT_QAT = {"epochs": 2, "lr": 0.01, "batch_size": 128, "momentum": 0.9, "weight_decay": 5e-4}
"""QAT settings used when ``build_quantized`` gets a QAT spec but no ``TrainConfig``."""


_SWAPS: dict[type[nn.Module], Any] = {
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
    nn.MultiheadAttention: QuantMultiheadAttention,
}
"""Float layer type -> its quantized form (``from_float(layer, weight_spec=, act_spec=)``)."""


def _swap_for(module: nn.Module) -> Any:
    if isinstance(module, (*QUANT_LAYERS, QuantMultiheadAttention)):
        return None
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return None  # MultiheadAttention's out_proj: swapped with its attention
    return next((q for f, q in _SWAPS.items() if isinstance(module, f)), None)


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the Conv2d/Linear/MultiheadAttention layers ``quantize`` swaps, in
    registration order."""
    return [name for name, module in model.named_modules() if _swap_for(module) is not None]


def _with_bits(*sides: QuantizerSpec | None, bits: int) -> tuple[QuantizerSpec | None, ...]:
    """The same quantizers at ``bits`` (float sides stay float)."""
    return tuple(None if side is None else replace(side, bits=bits) for side in sides)


def quantize(model: nn.Module, spec: QuantSpec, *, first_last_bits: int | None = 8) -> nn.Module:
    """A deep copy of ``model`` with every Conv2d/Linear replaced by its fake-quant version and
    every ``nn.MultiheadAttention`` by ``QuantMultiheadAttention`` (quantized projections).

    The first and last quantizable layers (registration order: the stem conv and the
    classifier in every model of the zoo) use ``first_last_bits`` for the sides ``spec``
    quantizes, as is usual in the literature; ``None`` keeps them at the spec's bits. Weight
    qparams start from the per-channel weight range; activation qparams need ``calibrate``
    (otherwise they initialise from the first batch seen). The spec is recorded as
    ``model.quant_spec``; an fp32 spec returns a plain copy.
    """
    if first_last_bits is not None:
        check_bits(first_last_bits, "first_last_bits")
    qmodel = copy.deepcopy(model)
    if not spec.is_float:
        names = quantizable_layers(qmodel)
        for i, name in enumerate(names):
            weight_spec, act_spec = spec.weights, spec.activations
            if first_last_bits is not None and i in (0, len(names) - 1):
                weight_spec, act_spec = _with_bits(weight_spec, act_spec, bits=first_last_bits)
            layer = qmodel.get_submodule(name)
            try:
                new = _swap_for(layer).from_float(layer, weight_spec=weight_spec, act_spec=act_spec)
            except InvalidSpecError as exc:
                raise InvalidSpecError(f"layer {name or type(layer).__name__!r}: {exc}") from None
            if name == "":
                qmodel = new
            else:
                parent, _, child = name.rpartition(".")
                setattr(qmodel.get_submodule(parent), child, new)
    qmodel.quant_spec = spec
    return qmodel


# -- build ----------------------------------------------------------------------------------------


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Quantizer scales train without weight decay (decay would pull the grid towards zero)."""
    scales = {id(m.scale) for m in model.modules() if isinstance(m, FakeQuantizer)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in scales]}]
    scale_params = [p for p in params if id(p) in scales]
    if scale_params:
        groups.append({"params": scale_params, "weight_decay": 0.0})
    return groups


def build_quantized(
    fp32_model: nn.Module,
    spec: QuantSpec,
    train: Split,
    *,
    qat: TrainConfig | None = None,
    calibration: str = "mse",
    first_last_bits: int | None = 8,
    device: torch.device | str = "auto",
    calibration_images: torch.Tensor | None = None,
    progress: bool = True,
    input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> nn.Module:
    """quantize -> calibrate -> LSQ QAT (if ``spec.method == "qat"``) -> frozen scales (cheap
    fake-quant op) -> eval mode.

    Calibration uses ``calibration_images`` when given (so a caller can hand ONNX Runtime the
    same images), else a seeded random draw of ``CALIBRATION_IMAGES`` from ``train`` (seed of
    ``qat`` or 0). QAT trains weights and quantizer scales with
    ``quantpatch.models.train_model`` (``DEFAULT_QAT`` when ``qat`` is None). The result gives
    input gradients through the straight-through estimator.

    ``input_transform`` (certifiable training: the ablated or masked inputs of a certified
    defence) is applied to the drawn calibration images and to every QAT batch; given
    ``calibration_images`` are taken as model inputs already.
    """
    device = resolve_device(device)
    qmodel = quantize(fp32_model, spec, first_last_bits=first_last_bits).to(device)
    if spec.is_float:
        return qmodel.eval()
    from quantpatch.models import TrainConfig, train_model

    config = qat if qat is not None else TrainConfig(**DEFAULT_QAT)
    if calibration_images is None:
        generator = torch.Generator().manual_seed(config.seed)
        calibration_images = train.images[
            torch.randperm(len(train), generator=generator)[:CALIBRATION_IMAGES]
        ]
        if input_transform is not None:
            with torch.no_grad():
                calibration_images = input_transform(calibration_images)
    calibrate(qmodel, calibration_images, calibration, device, seed=config.seed)
    if spec.method == "qat" and config.epochs > 0:
        set_learnable(qmodel, True)
        try:
            train_model(
                qmodel,
                train,
                config,
                device,
                progress=progress,
                desc=f"QAT {spec.name}",
                param_groups=param_groups(qmodel),
                input_transform=input_transform,
            )
        finally:
            set_learnable(qmodel, False)
    return qmodel.eval()
