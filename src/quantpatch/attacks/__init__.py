"""Adversarial attacks: universal and per-image patches (white-box, generative and
query-only), plus pixel L-inf attacks for contrast: PGD, and APGD and Square Attack
from torchattacks (optional).

``create_attack(name, **params)`` is the one entry point; ``ATTACKS`` lists the names.
Importing an attack module registers it. ``Attack`` is the contract every attack keeps;
``UniversalAttack`` (one patch learned in ``fit``) and ``PerImageAttack`` (a search per image
in ``perturb``) are the two families' bases.
"""

from quantpatch.attacks.base import ATTACKS, Attack, create_attack
from quantpatch.attacks.per_image import PerImageAttack
from quantpatch.attacks.placement import (
    EOT,
    Placement,
    apply_patch,
    paste_at,
    patch_mask,
    sample_placement,
)
from quantpatch.attacks.universal_base import FitPoint, UniversalAttack

# importing an attack module registers it in ATTACKS
from quantpatch.attacks import universal  # noqa: E402,F401  isort: skip
from quantpatch.attacks import random_patch  # noqa: E402,F401  isort: skip
from quantpatch.attacks import lavan  # noqa: E402,F401  isort: skip
from quantpatch.attacks import patch_pgd  # noqa: E402,F401  isort: skip
from quantpatch.attacks import multibit  # noqa: E402,F401  isort: skip
from quantpatch.attacks import pgd_linf  # noqa: E402,F401  isort: skip
from quantpatch.attacks import sparse_rs  # noqa: E402,F401  isort: skip
from quantpatch.attacks import sparse_rs_universal  # noqa: E402,F401  isort: skip
from quantpatch.attacks import gap  # noqa: E402,F401  isort: skip
from quantpatch.attacks import pixel_reference  # noqa: E402,F401  isort: skip
from quantpatch.attacks.gap import GAP  # noqa: E402  isort: skip
from quantpatch.attacks.lavan import LaVAN  # noqa: E402  isort: skip
from quantpatch.attacks.multibit import MultibitPatch  # noqa: E402  isort: skip
from quantpatch.attacks.patch_pgd import PatchPGD  # noqa: E402  isort: skip
from quantpatch.attacks.pgd_linf import PGDLinf  # noqa: E402  isort: skip
from quantpatch.attacks.pixel_reference import APGDCE, APGDDLR, SquareLinf  # noqa: E402  isort: skip
from quantpatch.attacks.random_patch import RandomPatch  # noqa: E402  isort: skip
from quantpatch.attacks.sparse_rs import SparseRS  # noqa: E402  isort: skip
from quantpatch.attacks.sparse_rs_universal import SparseRSUniversal  # noqa: E402  isort: skip
from quantpatch.attacks.universal import UniversalPatch  # noqa: E402  isort: skip

__all__ = [
    "APGDCE",
    "APGDDLR",
    "ATTACKS",
    "EOT",
    "GAP",
    "FitPoint",
    "Attack",
    "LaVAN",
    "MultibitPatch",
    "PGDLinf",
    "PatchPGD",
    "PerImageAttack",
    "Placement",
    "RandomPatch",
    "SparseRS",
    "SparseRSUniversal",
    "SquareLinf",
    "UniversalAttack",
    "UniversalPatch",
    "apply_patch",
    "create_attack",
    "paste_at",
    "patch_mask",
    "sample_placement",
]
