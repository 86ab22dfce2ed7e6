"""``quantize`` (module swap), ``calibrate`` (PTQ ranges) and ``build_quantized`` (+ LSQ QAT)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from quantpatch._runtime import resolve_device
from quantpatch.errors import InvalidSpecError, ShapeError, UnknownNameError
from quantpatch.quant.layers import (
    QUANT_LAYERS,
    FakeQuantizer,
    QuantConv2d,
    QuantLinear,
    init_weight_quantizer,
    set_learnable,
)
from quantpatch.quant.spec import QuantSpec

if TYPE_CHECKING:
    from quantpatch.data import Split
    from quantpatch.models import TrainConfig

CALIBRATION_METHODS = ("minmax", "percentile", "mse")
PERCENTILE = 99.99
CALIBRATION_IMAGES = 1024
_SAMPLES_PER_LAYER = 1 << 20  # activation values kept per layer for percentile / MSE
_MSE_RATIOS = 40

DEFAULT_QAT = {"epochs": 2, "lr": 0.01, "batch_size": 128, "momentum": 0.9, "weight_decay": 5e-4}
"""QAT settings used when ``build_quantized`` gets a QAT spec but no ``TrainConfig``."""


def _quantizable(module: nn.Module) -> bool:
    if isinstance(module, QUANT_LAYERS):
        return False
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return False  # MultiheadAttention reads its weight directly; swapping would do nothing
    return isinstance(module, (nn.Conv2d, nn.Linear))


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the Conv2d/Linear layers ``quantize`` swaps, in registration order."""
    return [name for name, module in model.named_modules() if _quantizable(module)]


def quantize(model: nn.Module, spec: QuantSpec, *, first_last_bits: int | None = 8) -> nn.Module:
    """A deep copy of ``model`` with every Conv2d/Linear replaced by its fake-quant version.

    The first and last quantizable layers (registration order: the stem conv and the
    classifier in every model of the zoo) use ``first_last_bits`` for the sides ``spec``
    quantizes, as is usual in the literature; ``None`` keeps them at the spec's bits. Weight
    qparams start from the per-channel weight range; activation qparams need ``calibrate``
    (otherwise they initialise from the first batch seen). The spec is recorded as
    ``model.quant_spec``; an fp32 spec returns a plain copy.
    """
    if first_last_bits is not None and (
        isinstance(first_last_bits, bool) or not 1 <= int(first_last_bits) <= 8
    ):
        raise InvalidSpecError(f"first_last_bits must be in 1..8 or None, got {first_last_bits!r}")
    qmodel = copy.deepcopy(model)
    if not spec.is_float:
        names = quantizable_layers(qmodel)
        for i, name in enumerate(names):
            weight_bits, act_bits = spec.weight_bits, spec.act_bits
            if first_last_bits is not None and i in (0, len(names) - 1):
                weight_bits = None if weight_bits is None else first_last_bits
                act_bits = None if act_bits is None else first_last_bits
            layer = qmodel.get_submodule(name)
            cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
            new = cls.from_float(
                layer,
                weight_bits=weight_bits,
                act_bits=act_bits,
                per_channel=spec.per_channel,
                symmetric=spec.symmetric,
            )
            if name == "":
                qmodel = new
            else:
                parent, _, child = name.rpartition(".")
                setattr(qmodel.get_submodule(parent), child, new)
    qmodel.quant_spec = spec
    return qmodel


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantConv2d | QuantLinear]]:
    """``(name, layer)`` for every quantized layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, QUANT_LAYERS):
            yield name, module


# -- calibration --------------------------------------------------------------------------------


class _Observer:
    """Exact min/max plus a bounded random sample of one activation stream."""

    def __init__(self, per_batch: int, generator: torch.Generator) -> None:
        self.per_batch = per_batch
        self.generator = generator
        self.low = float("inf")
        self.high = float("-inf")
        self.samples: list[torch.Tensor] = []

    def __call__(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().reshape(-1).float()
        self.low = min(self.low, float(x.min()))
        self.high = max(self.high, float(x.max()))
        if x.numel() > self.per_batch:
            idx = torch.randint(x.numel(), (self.per_batch,), generator=self.generator)
            x = x[idx.to(x.device)]
        self.samples.append(x.clone())

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples)


def _activation_range(quantizer: FakeQuantizer, obs: _Observer, method: str) -> tuple[float, float]:
    low, high = min(obs.low, 0.0), max(obs.high, 0.0)
    if method == "minmax":
        return low, high
    sample = obs.sample()
    if method == "percentile":
        k_high = max(1, min(sample.numel(), round(sample.numel() * PERCENTILE / 100)))
        k_low = max(1, min(sample.numel(), round(sample.numel() * (1 - PERCENTILE / 100))))
        hi = float(sample.kthvalue(k_high).values)
        lo = float(sample.kthvalue(k_low).values)
        return min(lo, 0.0), max(hi, 0.0)
    # mse: shrink the observed range by a common ratio; keep the ratio with least error
    best, best_err = (low, high), float("inf")
    for ratio in torch.linspace(1.0 / _MSE_RATIOS, 1.0, _MSE_RATIOS).tolist():
        quantizer.set_range(torch.tensor(low * ratio), torch.tensor(high * ratio))
        err = float((quantizer(sample) - sample).pow(2).mean())
        if err < best_err:
            best, best_err = (low * ratio, high * ratio), err
    return best


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def calibrate(
    qmodel: nn.Module,
    images: torch.Tensor,
    method: str = "minmax",
    device: torch.device | str = "auto",
    batch_size: int = 256,
    *,
    seed: int = 0,
) -> nn.Module:
    """Set every quantizer's scale/zero-point from ``images`` (N, C, H, W) in [0, 1].

    Activations (per-tensor, asymmetric) are observed in float at each quantized layer's input
    while weights are already quantized, then ranged by ``minmax`` (observed min/max),
    ``percentile`` (0.01th/99.99th percentile; a non-negative stream keeps 0 as its floor) or
    ``mse`` (the shrink ratio of the min/max range with the least quantization MSE). Weight
    scales come from the per-channel weight range (``minmax``, ``percentile``: a weight tensor
    has no outliers worth clipping at 8 bit and too few values per channel for a percentile)
    or from a per-channel MSE search (``mse``). Returns ``qmodel`` (modified in place).
    """
    if method not in CALIBRATION_METHODS:
        raise UnknownNameError(
            f"unknown calibration method '{method}'; choose from: {', '.join(CALIBRATION_METHODS)}"
        )
    if images.ndim != 4 or len(images) == 0:
        raise ShapeError(
            f"calibration images must be a non-empty (N, C, H, W), got {tuple(images.shape)}"
        )
    device = resolve_device(device)
    qmodel.to(device)
    layers = [layer for _, layer in quant_layers(qmodel)]
    weight_method = "mse" if method == "mse" else "max"
    for layer in layers:
        if layer.weight_quant is not None:
            init_weight_quantizer(layer.weight_quant, layer.weight, weight_method)
    act_quants = [layer.act_quant for layer in layers if layer.act_quant is not None]
    if not act_quants:
        return qmodel
    n_batches = -(-len(images) // batch_size)
    generator = torch.Generator().manual_seed(seed)
    observers = [
        _Observer(max(_SAMPLES_PER_LAYER // n_batches, 1024), generator) for _ in act_quants
    ]
    handles = [
        q.register_forward_pre_hook(obs) for q, obs in zip(act_quants, observers, strict=True)
    ]
    try:
        for q in act_quants:
            q.enabled = False
        with _evaluating(qmodel), torch.inference_mode():
            for start in range(0, len(images), batch_size):
                qmodel(images[start : start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
        for q in act_quants:
            q.enabled = True
    with torch.no_grad():
        for q, obs in zip(act_quants, observers, strict=True):
            low, high = _activation_range(q, obs, method)
            q.set_range(torch.tensor(low), torch.tensor(high))
    return qmodel


# -- build ----------------------------------------------------------------------------------------


def _param_groups(model: nn.Module) -> list[dict[str, Any]]:
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
    calibration_images: int = CALIBRATION_IMAGES,
    progress: bool = True,
) -> nn.Module:
    """quantize -> calibrate on up to ``calibration_images`` train images -> LSQ QAT (if
    ``spec.method == "qat"``) -> frozen scales (cheap fake-quant op) -> eval mode.

    The calibration subset is a seeded random draw (seed of ``qat`` or 0). QAT trains weights
    and quantizer scales with ``quantpatch.models.train_model`` (``DEFAULT_QAT`` when ``qat``
    is None). The result gives input gradients through the straight-through estimator.
    """
    device = resolve_device(device)
    qmodel = quantize(fp32_model, spec, first_last_bits=first_last_bits).to(device)
    if spec.is_float:
        return qmodel.eval()
    from quantpatch.models import TrainConfig, train_model

    config = qat if qat is not None else TrainConfig(**DEFAULT_QAT)
    generator = torch.Generator().manual_seed(config.seed)
    idx = torch.randperm(len(train), generator=generator)[:calibration_images]
    calibrate(qmodel, train.images[idx], calibration, device, seed=config.seed)
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
                param_groups=_param_groups(qmodel),
            )
        finally:
            set_learnable(qmodel, False)
    return qmodel.eval()
