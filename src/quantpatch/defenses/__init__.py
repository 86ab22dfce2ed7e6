"""Defences against patches, each a target (and, for input transformations, an attack source).

``create_defense(name, **params)`` is the one entry point; ``DEFENSES`` lists the names.
Input transformations (``InputDefense``: median, gaussian-blur, lgs, jpeg, bit-depth) map images
in [0, 1] to images in [0, 1], batched; ``DefendedModel(model, defense)`` puts one in front of a
model, with BPDA (straight-through gradients) where the transform is not differentiable, so
adaptive attacks can optimise through it. ``PatchCleanser`` certifies robustness to one patch
of a stated size around any predictor, ONNX Runtime sessions included, and so does
``DerandomizedSmoothing`` (column or block ablation, whose base model takes the 2C-channel
ablation encoding). Both answer ``certify(model, images, labels, device) -> (labels,
certified)``, ``check_image_size(image_hw)`` and ``train_transform(seed)``, the input transform
that trains a base model on what the defence will show it (``certifiable``).
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
from quantpatch.defenses.derandomized import (  # noqa: E402  isort: skip
    AblationSet,
    Ceiling,
    DerandomizedSmoothing,
    SoftVote,
    certify_counts,
)
from quantpatch.defenses.certifiable import (  # noqa: E402  isort: skip
    InputTransform,
    PlainInputAdapter,
    RandomAblation,
    RandomMasks,
    certifiable_transform,
    create_ablation_model,
    encode_ablation,
)

__all__ = [
    "DEFENSES",
    "AblationSet",
    "Ceiling",
    "Certifier",
    "DefendedModel",
    "Defense",
    "DerandomizedSmoothing",
    "InputDefense",
    "InputTransform",
    "MaskSet",
    "PatchCleanser",
    "PlainInputAdapter",
    "RandomAblation",
    "RandomMasks",
    "SoftVote",
    "certifiable_transform",
    "certify_counts",
    "create_ablation_model",
    "create_defense",
    "encode_ablation",
    "mask_set",
    "straight_through",
]
