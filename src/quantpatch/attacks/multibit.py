"""``multibit``: a quantization-aware universal patch.

The Brown et al. EOT patch, optimised against the mean loss over several precisions of one
architecture (fp32, w8a8, w4a4, ... passed together as ``models``), so the patch does not
overfit one quantization grid and transfers across bit-widths.
"""

from __future__ import annotations

from quantpatch.attacks.base import ATTACKS
from quantpatch.attacks.universal import UniversalPatch


@ATTACKS.register
class MultibitPatch(UniversalPatch):
    """Universal EOT patch against the mean loss over every precision of the source model."""

    name = "multibit"
    multi_precision = True
