"""Input-transformation defences against patches; ``DefendedModel`` makes any one a target.

Each defence maps images in [0, 1] to images in [0, 1], batched and differentiable where the
operation allows, so adaptive attacks can run through it."""

from quantpatch.defenses import smoothing as _smoothing  # noqa: F401  (registers defences)
from quantpatch.defenses.base import DEFENSES, DefendedModel, create_defense

__all__ = ["DEFENSES", "DefendedModel", "create_defense"]
