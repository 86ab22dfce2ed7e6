"""Calibration: ``calibrate`` observes activations, then a registered method sets the ranges.

``CALIBRATIONS`` maps a name to a ``Calibration`` subclass. A method decides the range of
each activation quantizer from an ``Observation`` of its input (exact min/max plus a bounded
random sample) and, optionally, how weights are ranged (default: each channel's min/max). A
new method is one registered class in this file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from quantpatch._registry import Registry
from quantpatch._runtime import resolve_device
from quantpatch.errors import ShapeError
from quantpatch.quant.grids import Range
from quantpatch.quant.layers import (
    FakeQuantizer,
    init_weight_quantizer,
    quant_layers,
    weight_minmax,
)

_SAMPLES_PER_LAYER = 1 << 20  # activation values kept per layer for percentile / MSE


class Observation:
    """Exact min/max plus a bounded random sample of one activation stream (a forward pre-hook)."""

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

    def range(self) -> tuple[float, float]:
        """Observed min/max widened to include 0 (zero must stay exact)."""
        return min(self.low, 0.0), max(self.high, 0.0)

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples)


class Calibration:
    """A calibration method: activation range from an observation, weight range per row.

    ``float_weights`` says what the activations are observed on: the network with its weights
    already quantized (default: the ranges then include the weight error the model will have)
    or the float network, as ONNX Runtime's static calibration does.
    """

    float_weights = False

    def activation_range(self, quantizer: FakeQuantizer, obs: Observation) -> tuple[float, float]:
        raise NotImplementedError

    def weight_range(self, quantizer: FakeQuantizer, rows: torch.Tensor) -> Range:
        """Per-row (channel) range; the full range by default, as weight tensors have few
        outliers worth clipping at 8 bit and too few values per channel for a percentile."""
        return weight_minmax(quantizer, rows)


CALIBRATIONS: Registry[type[Calibration]] = Registry("calibration method")


@CALIBRATIONS.register("minmax")
class MinMax(Calibration):
    """Observed min/max (widened to include 0)."""

    def activation_range(self, quantizer: FakeQuantizer, obs: Observation) -> tuple[float, float]:
        return obs.range()


@CALIBRATIONS.register("float-minmax")
class FloatMinMax(MinMax):
    """Min/max observed on the float network, as ONNX Runtime's static MinMax calibration."""

    float_weights = True


@CALIBRATIONS.register("percentile")
class Percentile(Calibration):
    """0.01th/99.99th percentile of the sample; a non-negative stream keeps 0 as its floor."""

    percentile = 99.99

    def activation_range(self, quantizer: FakeQuantizer, obs: Observation) -> tuple[float, float]:
        sample = obs.sample()
        n = sample.numel()
        k_high = max(1, min(n, round(n * self.percentile / 100)))
        k_low = max(1, min(n, round(n * (1 - self.percentile / 100))))
        hi = float(sample.kthvalue(k_high).values)
        lo = float(sample.kthvalue(k_low).values)
        return min(lo, 0.0), max(hi, 0.0)


@CALIBRATIONS.register("mse")
class MSE(Calibration):
    """Shrink the min/max range by the ratio with the least quantization MSE (activations: one
    ratio for the sample; weights: one per channel)."""

    ratios = 40

    def activation_range(self, quantizer: FakeQuantizer, obs: Observation) -> tuple[float, float]:
        low, high = obs.range()
        sample = obs.sample()
        best, best_err = (low, high), float("inf")
        for ratio in torch.linspace(1.0 / self.ratios, 1.0, self.ratios).tolist():
            quantizer.set_range(torch.tensor(low * ratio), torch.tensor(high * ratio))
            err = float((quantizer(sample) - sample).pow(2).mean())
            if err < best_err:
                best, best_err = (low * ratio, high * ratio), err
        return best

    def weight_range(self, quantizer: FakeQuantizer, rows: torch.Tensor) -> Range:
        low, high = weight_minmax(quantizer, rows)
        best_err = torch.full((rows.shape[0],), float("inf"), device=rows.device)
        best = (low.clone(), high.clone())
        for ratio in torch.linspace(0.05, 1.0, self.ratios).tolist():
            quantizer.set_range(low * ratio, high * ratio)
            err = (quantizer(rows) - rows).pow(2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[0][better] = low[better] * ratio
            best[1][better] = high[better] * ratio
        return best


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _observe(
    qmodel: nn.Module,
    act_quants: list[FakeQuantizer],
    images: torch.Tensor,
    device: torch.device,
    batch_size: int,
    seed: int,
    disabled: list[FakeQuantizer],
) -> list[Observation]:
    """Run ``images`` through ``qmodel`` with float activations (and the ``disabled``
    quantizers off), observing each activation quantizer's input."""
    n_batches = -(-len(images) // batch_size)
    generator = torch.Generator().manual_seed(seed)
    observations = [
        Observation(max(_SAMPLES_PER_LAYER // n_batches, 1024), generator) for _ in act_quants
    ]
    handles = [
        q.register_forward_pre_hook(obs) for q, obs in zip(act_quants, observations, strict=True)
    ]
    off = act_quants + disabled
    try:
        for q in off:
            q.enabled = False
        with _evaluating(qmodel), torch.inference_mode():
            for start in range(0, len(images), batch_size):
                qmodel(images[start : start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
        for q in off:
            q.enabled = True
    return observations


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

    Activations are observed in float at each quantized layer's input (and at the input of
    any other ``FakeQuantizer`` in the model, e.g. one on its output), with the weights already
    quantized unless the method says ``float_weights``; ``method`` (a name in
    ``CALIBRATIONS``) then ranges weights and activations. Returns ``qmodel`` (modified in place).
    """
    calibration = CALIBRATIONS.get(method)()
    if images.ndim != 4 or len(images) == 0:
        raise ShapeError(
            f"calibration images must be a non-empty (N, C, H, W), got {tuple(images.shape)}"
        )
    device = resolve_device(device)
    qmodel.to(device)
    layers = [layer for _, layer in quant_layers(qmodel)]
    weight_quants = [layer.weight_quant for layer in layers if layer.weight_quant is not None]
    for layer in layers:
        if layer.weight_quant is not None:
            init_weight_quantizer(layer.weight_quant, layer.weight, calibration.weight_range)
    owned = {id(q) for layer in layers for q in (layer.weight_quant, layer.act_quant)}
    act_quants = [layer.act_quant for layer in layers if layer.act_quant is not None] + [
        q for q in qmodel.modules() if isinstance(q, FakeQuantizer) and id(q) not in owned
    ]
    if not act_quants:
        return qmodel
    disabled = weight_quants if calibration.float_weights else []
    observations = _observe(qmodel, act_quants, images, device, batch_size, seed, disabled)
    with torch.no_grad():
        for q, obs in zip(act_quants, observations, strict=True):
            low, high = calibration.activation_range(q, obs)
            q.set_range(torch.tensor(low), torch.tensor(high))
    return qmodel
