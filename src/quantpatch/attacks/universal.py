"""``universal``: the EOT adversarial patch of Brown et al. (2017), "Adversarial Patch".

Adam on the patch pixels (clamped to [0, 1] after every step); each step draws a batch from the
train split and a random location, rotation and scale per image. The fit and the paste are the
universal base's template (``UniversalAttack.learn_patch``, ``UniversalAttack.batch_step``);
this attack adds only a separate placement range for evaluation, which its variants share.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from quantpatch.attacks.base import ATTACKS
from quantpatch.attacks.placement import EOT
from quantpatch.attacks.universal_base import UniversalAttack


@ATTACKS.register
class UniversalPatch(UniversalAttack):
    """Brown et al. 2017 EOT universal patch: Adam on pixels over random placements.

    ``eval_eot`` sets how ``perturb`` places the learned patch (default: the training ``eot``).
    """

    name = "universal"
    kind = "patch"
    default_steps = 300
    default_lr = 0.05

    def __init__(self, *, eval_eot: EOT | Mapping[str, Any] | None = None, **common: Any) -> None:
        super().__init__(**common)
        self.eval_eot = EOT.coerce(eval_eot, self.eot)

    @property
    def paste_eot(self) -> EOT:
        return self.eval_eot
