"""Fake-quantized Conv2d/Linear built on PyTorch's native fake-quant ops.

Each layer fake-quantizes its weight (per-channel on the ``narrow`` grid by default) and its
input activation (per-tensor on the ``asym`` grid: the first layer sees signed normalised
pixels, later layers unsigned ReLU outputs). The grid (``quantpatch.quant.grids``) decides the
codes and fits scale and zero point; the quantizer only applies them. Gradients are
straight-through: the native ops pass the incoming gradient unchanged inside the clipping range
and zero it outside, so attacks get honest input gradients. Two op families are used:

* ``torch.fake_quantize_per_{tensor,channel}_affine`` when the scales are fixed (evaluation,
  attacks, PTQ): one cheap fused kernel, no scale gradient.
* ``torch._fake_quantize_learnable_per_{tensor,channel}_affine`` (LSQ) while the scales are
  trained (QAT): the op also returns the scale gradient.

The choice is made per call from ``scale.requires_grad`` (see ``FakeQuantizer.learnable``), so
freezing the scales after QAT switches the model back to the cheap path.

A ``shifted`` grid (1 bit: two levels) is built from the same native op by shifting the input:
``fq(x + o, s, zp=0, qmin=0, qmax=1) - o`` with offset ``o = zero_point * scale``, as the
per-tensor ops round a fractional zero point; binary weights use ``zero_point = 0.5`` and give
``{-s/2, +s/2}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from quantpatch.errors import InvalidSpecError, ShapeError
from quantpatch.quant.grids import EPS, Grid, Range
from quantpatch.quant.spec import QuantizerSpec, QuantSpec

_W8A8 = QuantSpec(8, 8)


class FakeQuantizer(nn.Module):
    """Quantize-dequantize one tensor on ``grid`` with native ops and straight-through gradients.

    ``scale`` is a parameter (trained by LSQ during QAT, frozen otherwise) and ``zero_point`` a
    buffer holding the grid's zero points (float dtype, as the learnable ops require), both
    shaped ``(channels,)``; ``channels == 1`` means per-tensor.
    """

    def __init__(self, grid: Grid, *, channels: int = 1, axis: int = 0) -> None:
        super().__init__()
        self.grid = grid
        self.axis = axis
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.register_buffer("zero_point", torch.full((channels,), grid.initial_zero_point))
        self.initialized = False  # act quantizers self-initialise from the first batch if needed
        self.enabled = True  # False: pass-through (calibration observes float activations)

    @property
    def bits(self) -> int:
        return self.grid.bits

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
                self.scale.abs_().clamp_min_(EPS)
        self.scale.requires_grad_(learnable)

    def extra_repr(self) -> str:
        kind = "per-channel" if self.per_channel else "per-tensor"
        grid = self.grid
        return f"{type(grid).__name__}, bits={grid.bits}, {kind}, range=[{grid.qmin}, {grid.qmax}]"

    @torch.no_grad()
    def set_range(self, low: torch.Tensor, high: torch.Tensor) -> None:
        """Set scale/zero-point so the grid covers [low, high] (per channel or scalar)."""
        low = torch.as_tensor(low, dtype=torch.float32).reshape(-1).to(self.scale.device)
        high = torch.as_tensor(high, dtype=torch.float32).reshape(-1).to(self.scale.device)
        scale, zero_point = self.grid.qparams(low, high)
        self.scale.copy_(scale.clamp_min(EPS).expand_as(self.scale))
        self.zero_point.copy_(zero_point.expand_as(self.zero_point))
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
        return 1.0 / math.sqrt(max(n, 1) * max(self.grid.qmax, 1))

    def _fq(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.grid.qmin, self.grid.qmax
        if scale.requires_grad and torch.is_grad_enabled():
            gf = self._grad_factor(x)
            scale = scale.abs().clamp_min(EPS)  # keep LSQ's scale positive while it trains
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
        # the tensor-qparams op's CUDA kernel takes only an int32 zero point (the CPU one casts
        # it); zero points here are whole numbers, so the cast is exact on both
        zero_point = zero_point.to(torch.int32)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self.initialized:
            self.set_range(x.detach().amin(), x.detach().amax())
        if self.grid.shifted:
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


WeightRange = Callable[[FakeQuantizer, torch.Tensor], Range]
"""``(quantizer, rows) -> (low, high)`` per row: how a calibration method ranges weights."""


def weight_minmax(_quantizer: FakeQuantizer, rows: torch.Tensor) -> Range:
    """The full range of each row: weights have few outliers worth clipping."""
    return rows.amin(dim=1), rows.amax(dim=1)


@torch.no_grad()
def init_weight_quantizer(
    quantizer: FakeQuantizer, weight: torch.Tensor, weight_range: WeightRange = weight_minmax
) -> None:
    """Weight qparams from the weight itself, one row per channel (or one row per tensor): the
    grid's closed form where it has one (binary: mean |w|), else ``weight_range``."""
    w = weight.detach().float()
    rows = w.reshape(w.shape[0], -1) if quantizer.per_channel else w.reshape(1, -1)
    closed = quantizer.grid.weight_range(rows)
    quantizer.set_range(*(closed if closed is not None else weight_range(quantizer, rows)))


class _QuantMixin:
    """Shared construction and bookkeeping of the weight/input quantizers."""

    weight_quant: FakeQuantizer | None
    act_quant: FakeQuantizer | None

    def _init_quantizers(
        self, weight_spec: QuantizerSpec | None, act_spec: QuantizerSpec | None
    ) -> None:
        weight: torch.Tensor = self.weight  # type: ignore[attr-defined]
        weight_quant = None
        if weight_spec is not None:
            channels = weight.shape[0] if weight_spec.per_channel else 1
            weight_quant = FakeQuantizer(weight_spec.make_grid(), channels=channels, axis=0)
            weight_quant.to(weight.device)
            init_weight_quantizer(weight_quant, weight)
        self.register_module("weight_quant", weight_quant)  # type: ignore[attr-defined]
        act_quant = None
        if act_spec is not None:
            if act_spec.per_channel:
                raise InvalidSpecError("activation quantizers are per-tensor")
            act_quant = FakeQuantizer(act_spec.make_grid()).to(weight.device)
        self.register_module("act_quant", act_quant)  # type: ignore[attr-defined]
        # the weight quantized once by ``freeze_weight``; not saved (it is derived state)
        self.register_buffer("frozen_weight", None, persistent=False)  # type: ignore[attr-defined]
        self._frozen_state: tuple | None = None

    def _adopt(
        self,
        source: nn.Module,
        weight_spec: QuantizerSpec | None,
        act_spec: QuantizerSpec | None,
    ) -> Any:
        """Take over ``source``'s parameters and mode, then build quantizers for them."""
        self.weight = source.weight  # type: ignore[attr-defined]
        self.bias = source.bias  # type: ignore[attr-defined]
        self.train(source.training)  # type: ignore[attr-defined]
        self._init_quantizers(weight_spec, act_spec)
        return self

    @property
    def weight_bits(self) -> int | None:
        return None if self.weight_quant is None else self.weight_quant.bits

    @property
    def act_bits(self) -> int | None:
        return None if self.act_quant is None else self.act_quant.bits

    def quantized_weight(self) -> torch.Tensor:
        weight: torch.Tensor = self.weight  # type: ignore[attr-defined]
        if self.weight_quant is None:
            return weight
        frozen: torch.Tensor | None = self.frozen_weight  # type: ignore[attr-defined]
        if frozen is not None and self._frozen_still_holds():
            return frozen
        return self.weight_quant(weight)

    def _weight_state(self) -> tuple:
        """What the quantized weight depends on: the weight, its quantizer and that quantizer's
        qparams, held as objects (compared by identity, so none can be replaced by another at
        the same address), each tensor's storage and version (an in-place change bumps it),
        and whether anything trains (then the weight needs its graph)."""
        weight: torch.Tensor = self.weight  # type: ignore[attr-defined]
        quant = self.weight_quant
        assert quant is not None
        tensors = (weight, quant.scale, quant.zero_point)
        versions = tuple((t.data_ptr(), t._version, t.requires_grad) for t in tensors)
        return (quant, *tensors), (quant.enabled, quant.grid, versions)

    def _frozen_still_holds(self) -> bool:
        if self._frozen_state is None or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return False  # a traced or exported graph keeps the weight's own quantizer op
        (objects, values), (now_objects, now_values) = self._frozen_state, self._weight_state()
        same = all(a is b for a, b in zip(objects, now_objects, strict=True))
        return same and values == now_values

    def freeze_weight(self) -> None:
        """Quantize the weight once and reuse it in every later forward, for a copy whose
        weights no longer change (an attack's frozen copy runs thousands of passes). A change
        to the weight or its qparams afterwards, or training switched on, makes the layer
        quantize afresh."""
        weight: torch.Tensor = self.weight  # type: ignore[attr-defined]
        if self.weight_quant is None or weight.requires_grad or self.weight_quant.learnable:
            return  # nothing to quantize, or a weight or scale still being trained
        with torch.inference_mode(False), torch.no_grad():  # usable in autograd later
            self.frozen_weight = self.weight_quant(weight)
        self._frozen_state = self._weight_state()

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.act_quant is None else self.act_quant(x)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight and input; state_dict keys of Conv2d are kept."""

    def __init__(
        self,
        *args: Any,
        weight_spec: QuantizerSpec | None = _W8A8.weights,
        act_spec: QuantizerSpec | None = _W8A8.activations,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_quantizers(weight_spec, act_spec)

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        *,
        weight_spec: QuantizerSpec | None,
        act_spec: QuantizerSpec | None,
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
            weight_spec=None,
            act_spec=None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        return layer._adopt(conv, weight_spec, act_spec)

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
        weight_spec: QuantizerSpec | None = _W8A8.weights,
        act_spec: QuantizerSpec | None = _W8A8.activations,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_features, out_features, bias, **kwargs)
        self._init_quantizers(weight_spec, act_spec)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        *,
        weight_spec: QuantizerSpec | None,
        act_spec: QuantizerSpec | None,
    ) -> QuantLinear:
        """A quantized layer sharing ``linear``'s weight and bias tensors."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            weight_spec=None,
            act_spec=None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        return layer._adopt(linear, weight_spec, act_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.quantize_input(x), self.quantized_weight(), self.bias)


QUANT_LAYERS = (QuantConv2d, QuantLinear)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = may not attend) as -inf/0, a float mask as it is."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)


class QuantMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` computed from two ``QuantLinear`` projections.

    torch's attention reads ``in_proj_weight`` and ``out_proj.weight`` directly, so swapping
    its projections would leave them in float; this module computes the same function (packed
    q/k/v projection, scaled dot-product attention with ``attn_mask``/``key_padding_mask``,
    dropout on the weights, output projection) from ``in_proj`` and ``out_proj``, which
    ``quantize`` builds as quantized layers. Batched inputs only; separate key/value widths,
    ``add_bias_kv`` and ``add_zero_attn`` are refused.
    """

    def __init__(self, mha: nn.MultiheadAttention, in_proj: nn.Linear, out_proj: nn.Linear) -> None:
        super().__init__()
        self.num_heads = mha.num_heads
        self.dropout = mha.dropout
        self.batch_first = mha.batch_first
        self.in_proj = in_proj
        self.out_proj = out_proj

    @classmethod
    def from_float(
        cls,
        mha: nn.MultiheadAttention,
        *,
        weight_spec: QuantizerSpec | None,
        act_spec: QuantizerSpec | None,
    ) -> QuantMultiheadAttention:
        """Quantized projections sharing ``mha``'s weight and bias tensors."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise InvalidSpecError(
                "cannot quantize nn.MultiheadAttention with kdim/vdim != embed_dim, "
                "add_bias_kv or add_zero_attn"
            )
        embed = mha.embed_dim
        packed = nn.Linear(embed, 3 * embed, bias=mha.in_proj_bias is not None, device="meta")
        packed.weight, packed.bias = mha.in_proj_weight, mha.in_proj_bias
        specs = {"weight_spec": weight_spec, "act_spec": act_spec}
        layer = cls(
            mha,
            QuantLinear.from_float(packed, **specs),
            QuantLinear.from_float(mha.out_proj, **specs),
        )
        return layer.train(mha.training)

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple:
        """q, k, v: one projection when all three are one tensor (self-attention)."""
        if query is key and key is value:
            return self.in_proj(query).chunk(3, dim=-1)
        weights = self.in_proj.quantized_weight().chunk(3)
        biases = (None,) * 3 if self.in_proj.bias is None else self.in_proj.bias.chunk(3)
        return tuple(
            nn.functional.linear(self.in_proj.quantize_input(x), w, b)
            for x, w, b in zip((query, key, value), weights, biases, strict=True)
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if query.dim() != 3:
            raise ShapeError(f"attention takes batched (3-D) inputs, got {tuple(query.shape)}")
        if is_causal and attn_mask is None:
            raise ValueError("is_causal is a hint: pass the causal attn_mask as well")
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        q, k, v = (
            x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
            for x in self._project(query, key, value)
        )  # (batch, heads, length, head_dim)
        batch, heads, length, head_dim = q.shape
        scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
        mask = _additive(attn_mask, scores.dtype)
        if mask is not None:  # (length, source) or (batch * heads, length, source)
            scores = scores + (mask.view(batch, heads, length, -1) if mask.dim() == 3 else mask)
        padding = _additive(key_padding_mask, scores.dtype)
        if padding is not None:
            scores = scores + padding[:, None, None, :]
        weights = scores.softmax(dim=-1)
        attended = nn.functional.dropout(weights, self.dropout, self.training) @ v
        out = self.out_proj(attended.transpose(1, 2).flatten(2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=1) if average_attn_weights else weights


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantConv2d | QuantLinear]]:
    """``(name, layer)`` for every quantized layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, QUANT_LAYERS):
            yield name, module


def freeze_weights(model: nn.Module) -> nn.Module:
    """Quantize every frozen weight of ``model`` once (``freeze_weight``); returns ``model``.
    Same outputs, bit for bit: the forward reuses what the per-channel op returned."""
    for _, layer in quant_layers(model):
        layer.freeze_weight()
    return model


def set_learnable(model: nn.Module, learnable: bool) -> None:
    """Train (LSQ op) or freeze (cheap op) every quantizer scale in ``model``."""
    for module in model.modules():
        if isinstance(module, FakeQuantizer):
            module.set_learnable(learnable)
