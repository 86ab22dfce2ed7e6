"""Defences against patches, each a target (and, for input transformations, an attack source).

``create_defense(name, **params)`` is the one entry point; ``DEFENSES`` lists the names.
Input transformations (``InputDefense``: median, gaussian-blur, lgs, jpeg, bit-depth) map images
in [0, 1] to images in [0, 1], batched; ``DefendedModel(model, defense)`` puts one in front of a
model, with BPDA (straight-through gradients) where the transform is not differentiable, so
adaptive attacks can optimise through it. ``PatchCleanser`` certifies robustness to one patch
of a stated size around any predictor, ONNX Runtime sessions included.
"""

from quantpatch.defenses.base import (
    DEFENSES,
    Certifier,
    DefendedModel,
    Defense,
    InputDefense,
    create_defense,
    straight_through,
)

# importing a defence module registers its defences in DEFENSES
from quantpatch.defenses import smoothing  # noqa: E402,F401  isort: skip
from quantpatch.defenses import compression  # noqa: E402,F401  isort: skip
from quantpatch.defenses.patchcleanser import MaskSet, PatchCleanser, mask_set  # noqa: E402  isort: skip

__all__ = [
    "DEFENSES",
    "Certifier",
    "DefendedModel",
    "Defense",
    "InputDefense",
    "MaskSet",
    "PatchCleanser",
    "create_defense",
    "mask_set",
    "straight_through",
]
