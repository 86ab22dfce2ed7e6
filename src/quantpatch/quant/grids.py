"""Integer grids: which codes ``[qmin, qmax]`` a quantizer uses and how a float range maps there.

``GRIDS`` maps a name to a factory ``bits -> Grid``. The name doubles as the ``QuantSpec`` name
suffix that selects the grid for the weights (``w4a4-asym``), so a new grid is one registered
class here and needs no change to the spec grammar; the default weight grid (``narrow``) is
never written in names. Activations always use ``asym`` (they are rarely centred on zero).

A grid only computes scale and zero point; ``FakeQuantizer`` applies them with torch's native
fake-quant ops. A 1-bit grid has one step between two levels that need not straddle an integer
zero point, so it is ``shifted``: its fractional zero point is applied by shifting the input
(see ``quantpatch.quant.layers``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from quantpatch._registry import Registry
from quantpatch.errors import InvalidSpecError

MIN_BITS = 1
MAX_BITS = 8
EPS = 1e-8
"""Smallest scale: a zero-width range (a dead channel) must not divide by zero."""


def check_bits(value: Any, what: str = "bits") -> None:
    """``InvalidSpecError`` unless ``value`` is an int in 1..8 (callers handle ``None``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpecError(f"{what} must be an int in 1..8 or None, got {value!r}")
    if not MIN_BITS <= value <= MAX_BITS:
        raise InvalidSpecError(f"{what} must be in 1..8 (None = float), got {value}")


Range = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Grid:
    """The codes of a ``bits``-bit quantizer and the rule that fits them to a float range.

    Subclasses define ``qmin``/``qmax`` and ``qparams`` and may narrow the bit-widths they take.
    """

    bits: int
    min_bits: ClassVar[int] = MIN_BITS
    max_bits: ClassVar[int] = MAX_BITS

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if not self.min_bits <= self.bits <= self.max_bits:
            raise InvalidSpecError(
                f"{type(self).__name__} needs {self.min_bits}..{self.max_bits} bits, "
                f"got {self.bits}"
            )

    @property
    def qmin(self) -> int:
        raise NotImplementedError

    @property
    def qmax(self) -> int:
        raise NotImplementedError

    @property
    def shifted(self) -> bool:
        """True when the zero point is fractional and is applied by shifting the input."""
        return False

    @property
    def initial_zero_point(self) -> float:
        return 0.0

    def qparams(self, low: torch.Tensor, high: torch.Tensor) -> Range:
        """``(scale, zero_point)`` covering ``[low, high]`` elementwise (scale clamped later)."""
        raise NotImplementedError

    def weight_range(self, rows: torch.Tensor) -> Range | None:
        """A closed-form weight range per row, or ``None`` to let the calibration method pick."""
        return None


GRIDS: Registry[Callable[[int], Grid]] = Registry("quantizer grid")
DEFAULT_WEIGHT_GRID = "narrow"
ACTIVATION_GRID = "asym"


def _bound(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    return torch.maximum(low.abs(), high.abs())


@dataclass(frozen=True)
class SignedNarrow(Grid):
    """Signed, zero point 0, ``[-(2^(b-1) - 1), 2^(b-1) - 1]``: symmetric about 0, so 2 bit
    is ternary ``{-1, 0, 1} * s``; ``s = max|w| / qmax``."""

    min_bits: ClassVar[int] = 2

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:
        return -self.qmax

    def qparams(self, low: torch.Tensor, high: torch.Tensor) -> Range:
        bound = _bound(low, high)
        return bound / self.qmax, torch.zeros_like(bound)


@dataclass(frozen=True)
class Binary(Grid):
    """1 bit, ``{-s/2, +s/2}``: codes {0, 1} shifted by a zero point of 0.5. Weights take
    ``s/2 = mean|w|``, the L2-optimal magnitude for ``sign(w)``."""

    max_bits: ClassVar[int] = 1

    @property
    def qmin(self) -> int:
        return 0

    @property
    def qmax(self) -> int:
        return 1

    @property
    def shifted(self) -> bool:
        return True

    @property
    def initial_zero_point(self) -> float:
        return 0.5

    def qparams(self, low: torch.Tensor, high: torch.Tensor) -> Range:
        bound = _bound(low, high)
        return 2 * bound, torch.full_like(bound, 0.5)

    def weight_range(self, rows: torch.Tensor) -> Range:
        magnitude = rows.abs().mean(dim=1)
        return -magnitude, magnitude


@GRIDS.register(DEFAULT_WEIGHT_GRID)
def narrow(bits: int) -> Grid:
    """Signed narrow range, zero point 0 (2 bit = ternary); 1 bit = binary {-s/2, +s/2}."""
    return Binary(bits) if bits == 1 else SignedNarrow(bits)


@GRIDS.register("full")
@dataclass(frozen=True)
class SignedFull(Grid):
    """Signed, zero point 0, every code ``[-2^(b-1), 2^(b-1) - 1]``: one more level than
    ``narrow`` (2 bit: {-2, -1, 0, 1} * s) at the price of symmetry. ``s = max|w| / 2^(b-1)``
    puts the largest magnitude on the extra code, so that code is in use and a negative end is
    exact; a positive end past ``qmax`` clips by up to one step (MSE calibration weighs that).
    A scale that keeps both ends within half a step (``max|w| / 1.5`` at 2 bit) leaves the
    extra code unused wherever the largest weight is positive."""

    min_bits: ClassVar[int] = 2

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def qparams(self, low: torch.Tensor, high: torch.Tensor) -> Range:
        bound = _bound(low, high)
        return bound / -self.qmin, torch.zeros_like(bound)


@GRIDS.register("reduced")
@dataclass(frozen=True)
class ReducedRange(SignedNarrow):
    """ONNX Runtime's ``reduce_range`` int8 weights, 8 bit only: signed, zero point 0, codes
    ``[-64, 64]`` and ``s = max|w| / 64`` (129 levels), which ORT uses on x86 CPUs whose
    u8 x s8 kernels add pairs of products in saturating int16 (``quant.onnx.int8_saturates``).
    The matched simulation of ORT int8 needs it (``w8a8-ptq-reduced``)."""

    min_bits: ClassVar[int] = 8

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 2)


@GRIDS.register(ACTIVATION_GRID)
@dataclass(frozen=True)
class Affine(Grid):
    """Unsigned ``[0, 2^b - 1]`` plus a zero point: fits any range that includes 0 (which stays
    exact for ReLU zeros and zero padding); 1 bit is the free two-level grid {low, high}."""

    @property
    def qmin(self) -> int:
        return 0

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def shifted(self) -> bool:
        return self.bits == 1

    def qparams(self, low: torch.Tensor, high: torch.Tensor) -> Range:
        low = torch.minimum(low, torch.zeros_like(low))
        high = torch.maximum(high, torch.zeros_like(high))
        scale = ((high - low) / (self.qmax - self.qmin)).clamp_min(EPS)
        if self.shifted:
            return scale, -low / scale
        zero_point = (self.qmin - low / scale).round().clamp(self.qmin, self.qmax)
        return scale, zero_point
