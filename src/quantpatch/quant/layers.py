"""Fake-quantized Conv2d/Linear built on PyTorch's native fake-quant ops.

Each layer fake-quantizes its weight (per-channel symmetric by default) and its input
activation (per-tensor asymmetric: the first layer sees signed normalised pixels, later layers
unsigned ReLU outputs). Gradients are straight-through: the native ops pass the incoming
gradient unchanged inside the clipping range and zero it outside, so attacks get honest input
gradients. Two op families are used:

* ``torch.fake_quantize_per_{tensor,channel}_affine`` when the scales are fixed (evaluation,
  attacks, PTQ): one cheap fused kernel, no scale gradient.
* ``torch._fake_quantize_learnable_per_{tensor,channel}_affine`` (LSQ) while the scales are
  trained (QAT): the op also returns the scale gradient.

The choice is made per call from ``scale.requires_grad`` (see ``FakeQuantizer.learnable``), so
freezing the scales after QAT switches the model back to the cheap path.

1-bit is a two-level quantizer built from the same native op by shifting the input:
``fq(x + o, s, zp=0, qmin=0, qmax=1) - o`` with offset ``o = zero_point * scale``; symmetric
binary weights use ``zero_point = 0.5`` and give ``{-s/2, +s/2}``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from quantpatch.errors import InvalidSpecError

_EPS = 1e-8


def _check_bits(bits: int | None) -> None:
    if bits is not None and (isinstance(bits, bool) or not 1 <= int(bits) <= 8):
        raise InvalidSpecError(f"bits must be in 1..8 or None, got {bits!r}")


class FakeQuantizer(nn.Module):
    """Quantize-dequantize one tensor to ``bits`` with native ops and straight-through gradients.

    ``scale`` is a parameter (trained by LSQ during QAT, frozen otherwise) and ``zero_point`` a
    buffer holding integer values (float dtype, as the learnable ops require), both shaped
    ``(channels,)``; ``channels == 1`` means per-tensor.
    """

    def __init__(self, bits: int, *, channels: int = 1, signed: bool, axis: int = 0) -> None:
        super().__init__()
        _check_bits(bits)
        self.bits = int(bits)
        self.signed = bool(signed)  # symmetric signed grid (weights) vs unsigned + zero point
        self.axis = axis
        if self.bits == 1:
            self.quant_min, self.quant_max = 0, 1
        elif self.signed:  # narrow range keeps the grid symmetric: 2 bit = ternary
            self.quant_max = 2 ** (self.bits - 1) - 1
            self.quant_min = -self.quant_max
        else:
            self.quant_min, self.quant_max = 0, 2**self.bits - 1
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.register_buffer(
            "zero_point", torch.full((channels,), 0.5 if self._binary_sym else 0.0)
        )
        self.initialized = False  # act quantizers self-initialise from the first batch if needed
        self.enabled = True  # False: pass-through (calibration observes float activations)

    @property
    def _binary_sym(self) -> bool:
        return self.bits == 1 and self.signed

    @property
    def per_channel(self) -> bool:
        return self.scale.numel() > 1

    @property
    def learnable(self) -> bool:
        """True while the scale is being trained; forward then uses the LSQ op."""
        return self.scale.requires_grad

    def set_learnable(self, learnable: bool) -> None:
        if not learnable:  # LSQ may have pushed a scale through zero; the cheap op needs s > 0
            with torch.no_grad():
                self.scale.abs_().clamp_min_(_EPS)
        self.scale.requires_grad_(learnable)

    def extra_repr(self) -> str:
        kind = "per-channel" if self.per_channel else "per-tensor"
        grid = "signed" if self.signed else "unsigned"
        return f"bits={self.bits}, {kind}, {grid}, range=[{self.quant_min}, {self.quant_max}]"

    # -- qparams --------------------------------------------------------------------------------

    @torch.no_grad()
    def set_range(self, low: torch.Tensor, high: torch.Tensor) -> None:
        """Set scale/zero-point so the grid covers [low, high] (per channel or scalar).

        Signed grids use ``max(|low|, |high|)``; unsigned grids widen the range to include 0 so
        that zero stays exactly representable (ReLU zeros, zero padding).
        """
        low = torch.as_tensor(low, dtype=torch.float32).reshape(-1).to(self.scale.device)
        high = torch.as_tensor(high, dtype=torch.float32).reshape(-1).to(self.scale.device)
        if self.signed:
            bound = torch.maximum(low.abs(), high.abs())
            if self.bits == 1:
                scale, zero_point = 2 * bound, torch.full_like(bound, 0.5)
            else:
                scale, zero_point = bound / self.quant_max, torch.zeros_like(bound)
        else:
            low, high = (
                torch.minimum(low, torch.zeros_like(low)),
                torch.maximum(high, torch.zeros_like(high)),
            )
            scale = (high - low) / (self.quant_max - self.quant_min)
            scale = scale.clamp_min(_EPS)
            if self.bits == 1:  # free two-level grid {low, high}
                zero_point = -low / scale
            else:
                zero_point = (
                    (self.quant_min - low / scale).round().clamp(self.quant_min, self.quant_max)
                )
        self.scale.copy_(scale.clamp_min(_EPS).expand_as(self.scale))
        self.zero_point.copy_(zero_point.expand_as(self.zero_point))
        self.initialized = True

    @torch.no_grad()
    def set_binary_magnitude(self, magnitude: torch.Tensor) -> None:
        """Symmetric 1-bit grid ``{-m, +m}`` (``m = mean|w|`` is the L2-optimal choice)."""
        magnitude = torch.as_tensor(magnitude, dtype=torch.float32).reshape(-1)
        self.scale.copy_((2 * magnitude).clamp_min(_EPS).expand_as(self.scale))
        self.zero_point.fill_(0.5)
        self.initialized = True

    # -- forward --------------------------------------------------------------------------------

    def _shape(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-channel vector along ``axis`` of ``x``."""
        if not self.per_channel:
            return t
        shape = [1] * x.ndim
        shape[self.axis] = -1
        return t.reshape(shape)

    def _grad_factor(self, x: torch.Tensor) -> float:
        """LSQ gradient scale 1/sqrt(N * Qp), N = elements sharing one scale (per sample)."""
        if self.per_channel:
            n = x.numel() // x.shape[self.axis]
        else:
            n = x[0].numel() if x.ndim > 1 else x.numel()
        return 1.0 / math.sqrt(max(n, 1) * max(self.quant_max, 1))

    def _fq(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.quant_min, self.quant_max
        if scale.requires_grad and torch.is_grad_enabled():
            gf = self._grad_factor(x)
            scale = scale.abs().clamp_min(_EPS)  # keep LSQ's scale positive while it trains
            if self.per_channel:
                return torch._fake_quantize_learnable_per_channel_affine(
                    x, scale, zero_point, self.axis, qmin, qmax, gf
                )
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, scale, zero_point, qmin, qmax, gf
            )
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(
                x, scale, zero_point, self.axis, qmin, qmax
            )
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self.initialized:
            self.set_range(x.detach().amin(), x.detach().amax())
        if self.bits == 1:
            offset = self._shape(self.zero_point, x) * self._shape(self.scale, x)
            zeros = torch.zeros_like(self.zero_point)
            return self._fq(x + offset, self.scale, zeros) - offset
        return self._fq(x, self.scale, self.zero_point)

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "scale" in state_dict:
            self.initialized = True


class _QuantMixin:
    """Shared construction and bookkeeping of the weight/input quantizers."""

    weight_quant: FakeQuantizer | None
    act_quant: FakeQuantizer | None

    def _init_quantizers(
        self, weight_bits: int | None, act_bits: int | None, per_channel: bool, symmetric: bool
    ) -> None:
        _check_bits(weight_bits)
        _check_bits(act_bits)
        weight: torch.Tensor = self.weight  # type: ignore[attr-defined]
        weight_quant = None
        if weight_bits is not None:
            channels = weight.shape[0] if per_channel else 1
            weight_quant = FakeQuantizer(weight_bits, channels=channels, signed=symmetric, axis=0)
            weight_quant.to(weight.device)
            init_weight_quantizer(weight_quant, weight)
        self.register_module("weight_quant", weight_quant)  # type: ignore[attr-defined]
        act_quant = None
        if act_bits is not None:
            act_quant = FakeQuantizer(act_bits, signed=False).to(weight.device)
        self.register_module("act_quant", act_quant)  # type: ignore[attr-defined]

    def _adopt(
        self,
        source: nn.Module,
        weight_bits: int | None,
        act_bits: int | None,
        per_channel: bool,
        symmetric: bool,
    ) -> Any:
        """Take over ``source``'s parameters and mode, then build quantizers for them."""
        self.weight = source.weight  # type: ignore[attr-defined]
        self.bias = source.bias  # type: ignore[attr-defined]
        self.train(source.training)  # type: ignore[attr-defined]
        self._init_quantizers(weight_bits, act_bits, per_channel, symmetric)
        return self

    @property
    def weight_bits(self) -> int | None:
        return None if self.weight_quant is None else self.weight_quant.bits

    @property
    def act_bits(self) -> int | None:
        return None if self.act_quant is None else self.act_quant.bits

    def quantized_weight(self) -> torch.Tensor:
        weight: torch.Tensor = self.weight  # type: ignore[attr-defined]
        return weight if self.weight_quant is None else self.weight_quant(weight)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.act_quant is None else self.act_quant(x)


@torch.no_grad()
def init_weight_quantizer(
    quantizer: FakeQuantizer, weight: torch.Tensor, method: str = "max"
) -> None:
    """Weight qparams from the weight itself: ``max`` (per-channel range) or ``mse`` search."""
    w = weight.detach().float()
    flat = w.reshape(w.shape[0], -1) if quantizer.per_channel else w.reshape(1, -1)
    if quantizer._binary_sym:
        quantizer.set_binary_magnitude(flat.abs().mean(dim=1))
        return
    low, high = flat.amin(dim=1), flat.amax(dim=1)
    if method == "max":
        quantizer.set_range(low, high)
        return
    if method != "mse":
        raise ValueError(f"unknown weight calibration method {method!r}")
    best_err = torch.full((flat.shape[0],), float("inf"), device=flat.device)
    best = (low.clone(), high.clone())
    for ratio in torch.linspace(0.05, 1.0, 40).tolist():
        quantizer.set_range(low * ratio, high * ratio)
        err = (quantizer(flat) - flat).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best[0][better] = low[better] * ratio
        best[1][better] = high[better] * ratio
    quantizer.set_range(*best)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight and input; state_dict keys of Conv2d are kept."""

    def __init__(
        self,
        *args: Any,
        weight_bits: int | None = 8,
        act_bits: int | None = 8,
        per_channel: bool = True,
        symmetric: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_quantizers(weight_bits, act_bits, per_channel, symmetric)

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        *,
        weight_bits: int | None,
        act_bits: int | None,
        per_channel: bool = True,
        symmetric: bool = True,
    ) -> QuantConv2d:
        """A quantized layer sharing ``conv``'s weight and bias tensors."""
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            weight_bits=None,
            act_bits=None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        return layer._adopt(conv, weight_bits, act_bits, per_channel, symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input; state_dict keys of Linear are kept."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_bits: int | None = 8,
        act_bits: int | None = 8,
        per_channel: bool = True,
        symmetric: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_features, out_features, bias, **kwargs)
        self._init_quantizers(weight_bits, act_bits, per_channel, symmetric)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        *,
        weight_bits: int | None,
        act_bits: int | None,
        per_channel: bool = True,
        symmetric: bool = True,
    ) -> QuantLinear:
        """A quantized layer sharing ``linear``'s weight and bias tensors."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            weight_bits=None,
            act_bits=None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        return layer._adopt(linear, weight_bits, act_bits, per_channel, symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.quantize_input(x), self.quantized_weight(), self.bias)


QUANT_LAYERS = (QuantConv2d, QuantLinear)


def set_learnable(model: nn.Module, learnable: bool) -> None:
    """Train (LSQ op) or freeze (cheap op) every quantizer scale in ``model``."""
    for module in model.modules():
        if isinstance(module, FakeQuantizer):
            module.set_learnable(learnable)
