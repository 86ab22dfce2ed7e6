"""``QuantSpec``: one frozen value that fully describes a precision and prints as a short name.

Names are ``fp32`` or ``w<W>a<A>`` with W, A in 1..8 or 32 (32 = that side stays float), then
optional suffixes for non-default settings: ``-ptq`` (post-training quantization instead of
QAT), ``-pt`` (per-tensor instead of per-channel weights) and the name of a registered weight
grid other than the default ``narrow`` (``quantpatch.quant.grids.GRIDS``): ``-asym``
(asymmetric weights with a zero point), ``-full`` (all signed codes: 2 bit = 4 levels) or
``-reduced`` (ONNX Runtime's ``reduce_range`` int8 weights, ``[-64, 64]``; 8 bit only).
``QuantSpec.parse(spec.name) == spec`` for every valid spec, so the name can key caches and
appear in configs and reports.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from quantpatch.errors import InvalidSpecError
from quantpatch.quant.grids import (
    ACTIVATION_GRID,
    DEFAULT_WEIGHT_GRID,
    GRIDS,
    MAX_BITS,
    MIN_BITS,
    Grid,
    check_bits,
)

FLOAT_BITS = 32

_NAME_RE = re.compile(r"^w(\d+)a(\d+)((?:-[a-z][a-z0-9]*)*)$")
_SETTINGS = ("ptq", "qat", "pt")  # suffixes that are not grid names


def _spec_form() -> str:
    grids = "|".join(f"-{g}" for g in GRIDS.names() if g != DEFAULT_WEIGHT_GRID)
    return (
        f"expected 'fp32' or 'w<bits>a<bits>[-ptq|-qat][-pt][{grids}]' with bits "
        f"{MIN_BITS}-{MAX_BITS} or {FLOAT_BITS} (float), e.g. 'w8a8', 'w4a4', 'w2a32', 'w8a8-ptq'"
    )


def _check_grid(name: Any) -> None:
    if not isinstance(name, str) or name not in GRIDS:
        choices = ", ".join(GRIDS.names())
        raise InvalidSpecError(f"unknown quantizer grid {name!r}; choose from: {choices}")


@dataclass(frozen=True)
class QuantizerSpec:
    """One side of a layer: ``bits`` on the registered grid ``grid``, per output channel or per
    tensor. ``QuantSpec`` derives one per side; ``quantize`` raises the bits of the first and
    last layers by replacing ``bits``."""

    bits: int
    grid: str = ACTIVATION_GRID
    per_channel: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.per_channel, bool):
            raise InvalidSpecError(f"per_channel must be a bool, got {self.per_channel!r}")
        self.make_grid()  # validates bits and grid name

    def make_grid(self) -> Grid:
        _check_grid(self.grid)
        return GRIDS.get(self.grid)(self.bits)


@dataclass(frozen=True, init=False)
class QuantSpec:
    """Weight and activation bit-widths (``None`` = float) plus how the weights are quantized.

    ``per_channel`` and ``weight_grid`` describe the weight quantizer: ``narrow`` (default;
    signed, zero point 0, ``[-(2^(b-1) - 1), 2^(b-1) - 1]``, so 2 bit is ternary {-1, 0, 1}·s
    and 1 bit binary), ``full`` (signed, zero point 0, ``[-2^(b-1), 2^(b-1) - 1]``: 2 bit is
    {-2, -1, 0, 1}·s; ``w2a2-full``; 2 bits or more) or ``asym`` (affine with a zero point,
    as activations); activations are always per-tensor on the ``asym`` grid.
    Settings that cannot matter (e.g. the method of a float spec) are normalised to their
    defaults so that equal behaviour means equal, equally hashed values.
    """

    weight_bits: int | None
    act_bits: int | None
    per_channel: bool = True
    method: Literal["ptq", "qat"] = "qat"
    weight_grid: str = DEFAULT_WEIGHT_GRID

    def __init__(
        self,
        weight_bits: int | None,
        act_bits: int | None,
        per_channel: bool = True,
        method: Literal["ptq", "qat"] = "qat",
        *,
        weight_grid: str | None = None,
    ) -> None:
        for value, side in ((weight_bits, "weight"), (act_bits, "activation")):
            if value is not None:
                check_bits(value, f"{side} bits")
        if method not in ("ptq", "qat"):
            raise InvalidSpecError(f"method must be 'ptq' or 'qat', got {method!r}")
        if not isinstance(per_channel, bool):
            raise InvalidSpecError(f"per_channel must be a bool, got {per_channel!r}")
        if weight_grid is None:
            weight_grid = DEFAULT_WEIGHT_GRID
        _check_grid(weight_grid)
        if weight_bits is None:  # weight-quantizer settings are meaningless for float weights
            per_channel, weight_grid = True, DEFAULT_WEIGHT_GRID
        if weight_bits is None and act_bits is None:
            method = "qat"
        object.__setattr__(self, "weight_bits", weight_bits)
        object.__setattr__(self, "act_bits", act_bits)
        object.__setattr__(self, "per_channel", per_channel)
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "weight_grid", weight_grid)
        if weight_bits is not None:
            GRIDS.get(weight_grid)(weight_bits)  # InvalidSpecError where it has no such width

    @property
    def is_float(self) -> bool:
        return self.weight_bits is None and self.act_bits is None

    @property
    def weights(self) -> QuantizerSpec | None:
        """The weight quantizer (``None``: float weights)."""
        if self.weight_bits is None:
            return None
        return QuantizerSpec(self.weight_bits, self.weight_grid, self.per_channel)

    @property
    def activations(self) -> QuantizerSpec | None:
        """The input-activation quantizer (``None``: float activations)."""
        return None if self.act_bits is None else QuantizerSpec(self.act_bits)

    @property
    def name(self) -> str:
        if self.is_float:
            return "fp32"
        w = FLOAT_BITS if self.weight_bits is None else self.weight_bits
        a = FLOAT_BITS if self.act_bits is None else self.act_bits
        name = f"w{w}a{a}"
        if self.method == "ptq":
            name += "-ptq"
        if not self.per_channel:
            name += "-pt"
        if self.weight_grid != DEFAULT_WEIGHT_GRID:
            name += f"-{self.weight_grid}"
        return name

    def __str__(self) -> str:
        return self.name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, text: str) -> QuantSpec:
        """Inverse of ``.name`` (case-insensitive); ``float`` is accepted as ``fp32``."""
        if not isinstance(text, str):
            raise InvalidSpecError(
                f"quantization spec must be a string, got {text!r}; {_spec_form()}"
            )
        key = text.strip().lower()
        if key in ("fp32", "float", "float32"):
            return cls(None, None)
        match = _NAME_RE.match(key)
        if match is None:
            raise InvalidSpecError(f"invalid quantization spec {text!r}: {_spec_form()}")
        suffixes = [s for s in match.group(3).split("-") if s]
        grids = [s for s in suffixes if s in GRIDS and s not in _SETTINGS]
        known = all(s in _SETTINGS or s in grids for s in suffixes)
        if not known or len(set(suffixes)) != len(suffixes) or len(grids) > 1:
            raise InvalidSpecError(f"invalid quantization spec {text!r}: {_spec_form()}")
        if "ptq" in suffixes and "qat" in suffixes:
            raise InvalidSpecError(f"invalid quantization spec {text!r}: both -ptq and -qat")
        bits = []
        for digits in (match.group(1), match.group(2)):
            value = int(digits)
            if value == FLOAT_BITS:
                bits.append(None)
            elif MIN_BITS <= value <= MAX_BITS and digits == str(value):
                bits.append(value)
            else:
                raise InvalidSpecError(f"invalid quantization spec {text!r}: {_spec_form()}")
        try:
            return cls(
                bits[0],
                bits[1],
                per_channel="pt" not in suffixes,
                method="ptq" if "ptq" in suffixes else "qat",
                weight_grid=grids[0] if grids else DEFAULT_WEIGHT_GRID,
            )
        except InvalidSpecError as exc:  # e.g. a grid that needs more bits
            raise InvalidSpecError(f"invalid quantization spec {text!r}: {exc}") from None


FP32 = QuantSpec(None, None)
