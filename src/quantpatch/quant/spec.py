"""``QuantSpec``: one frozen value that fully describes a precision and prints as a short name.

Names are ``fp32`` or ``w<W>a<A>`` with W, A in 1..8 or 32 (32 = that side stays float), then
optional suffixes for non-default settings: ``-ptq`` (post-training quantization instead of
QAT), ``-pt`` (per-tensor instead of per-channel weights), ``-asym`` (asymmetric weights).
``QuantSpec.parse(spec.name) == spec`` for every valid spec, so the name can key caches and
appear in configs and reports.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from quantpatch.errors import InvalidSpecError

MIN_BITS = 1
MAX_BITS = 8
FLOAT_BITS = 32

_SPEC_FORM = (
    "expected 'fp32' or 'w<bits>a<bits>[-ptq|-qat][-pt][-asym]' with bits 1-8 or 32 (float), "
    "e.g. 'w8a8', 'w4a4', 'w2a32', 'w8a8-ptq'"
)
_NAME_RE = re.compile(r"^w(\d+)a(\d+)((?:-[a-z]+)*)$")
_SUFFIXES = {"ptq", "qat", "pt", "asym"}


def _check_bits(value: Any, side: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpecError(f"{side} bits must be an int in 1..8 or None, got {value!r}")
    if not MIN_BITS <= value <= MAX_BITS:
        raise InvalidSpecError(f"{side} bits must be in 1..8 (None = float), got {value}")


@dataclass(frozen=True)
class QuantSpec:
    """Weight and activation bit-widths (``None`` = float) plus how the weights are quantized.

    ``per_channel`` and ``symmetric`` describe the weight quantizer; activations are always
    per-tensor asymmetric. Settings that cannot matter (e.g. the method of a float spec) are
    normalised to their defaults so that equal behaviour means equal, equally hashed values.
    """

    weight_bits: int | None
    act_bits: int | None
    per_channel: bool = True
    symmetric: bool = True
    method: Literal["ptq", "qat"] = "qat"

    def __post_init__(self) -> None:
        _check_bits(self.weight_bits, "weight")
        _check_bits(self.act_bits, "activation")
        if self.method not in ("ptq", "qat"):
            raise InvalidSpecError(f"method must be 'ptq' or 'qat', got {self.method!r}")
        for field in ("per_channel", "symmetric"):
            if not isinstance(getattr(self, field), bool):
                raise InvalidSpecError(f"{field} must be a bool, got {getattr(self, field)!r}")
        if self.weight_bits is None:  # weight-quantizer settings are meaningless for float weights
            object.__setattr__(self, "per_channel", True)
            object.__setattr__(self, "symmetric", True)
        if self.is_float:
            object.__setattr__(self, "method", "qat")

    @property
    def is_float(self) -> bool:
        return self.weight_bits is None and self.act_bits is None

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
        if not self.symmetric:
            name += "-asym"
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
                f"quantization spec must be a string, got {text!r}; {_SPEC_FORM}"
            )
        key = text.strip().lower()
        if key in ("fp32", "float", "float32"):
            return cls(None, None)
        match = _NAME_RE.match(key)
        if match is None:
            raise InvalidSpecError(f"invalid quantization spec {text!r}: {_SPEC_FORM}")
        suffixes = [s for s in match.group(3).split("-") if s]
        if any(s not in _SUFFIXES for s in suffixes) or len(set(suffixes)) != len(suffixes):
            raise InvalidSpecError(f"invalid quantization spec {text!r}: {_SPEC_FORM}")
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
                raise InvalidSpecError(f"invalid quantization spec {text!r}: {_SPEC_FORM}")
        return cls(
            bits[0],
            bits[1],
            per_channel="pt" not in suffixes,
            symmetric="asym" not in suffixes,
            method="ptq" if "ptq" in suffixes else "qat",
        )


FP32 = QuantSpec(None, None)
