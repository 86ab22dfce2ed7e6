"""``Attack``, the contract every attack keeps, and the registry that builds them.

The study treats all attacks alike: it builds one by name, may ``fit`` it, asks ``perturb``
for adversarial images and records its settings. So the base owns only what every attack
shares, checked once: the common parameters, the batched ``perturb`` loop, seeding, frozen
model copies, target labels, the patch mask and the one objective (cross-entropy averaged over
the models, plus which images fool them all). How a batch is attacked is the families' own:
``UniversalAttack`` (``universal_base``) learns one patch and pastes it, ``PerImageAttack``
(``per_image``) searches each image's own perturbation, and query attacks such as
``sparse-rs`` build on this base directly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quantpatch._registry import Registry, accepted_params
from quantpatch._runtime import resolve_device, restart_draws
from quantpatch.attacks.placement import EOT, MASK_SHAPES, patch_mask
from quantpatch.data._types import Split
from quantpatch.errors import ConfigError, ShapeError
from quantpatch.models.fast import fast_frozen_copy
from quantpatch.quant.layers import freeze_weights

ATTACKS: Registry = Registry("attack")
"""Attack classes by name; ``create_attack(name, **params)`` builds one."""

# Success outranks any loss value when keeping the best adversarial example per image.
SUCCESS_BONUS = 1e6

BatchStep = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]
"""``(images, labels, index) -> adversarial images`` for one batch (``index``: its rows)."""


class Attack:
    """The contract: built from parameters, optionally ``fit``, then ``perturb``.

    Common parameters: ``patch_size`` (px), ``shape`` ("square" | "circle"), ``targeted`` and
    ``target_class``, ``steps``, ``lr`` (step size), ``batch_size``, ``eot`` (placement ranges;
    an ``EOT`` or a dict), ``seed`` and ``progress`` (tqdm bars). ``steps``/``lr``/``eot`` left
    as ``None`` take the attack's own defaults. Pixel attacks ignore the patch settings.
    A subclass writes ``batch_step``; one that learns something overrides ``fit`` and the
    state methods.
    """

    name: ClassVar[str] = ""
    universal: ClassVar[bool] = False
    """True for attacks that learn one patch in ``fit`` and paste it in ``perturb``."""
    kind: ClassVar[Literal["patch", "pixel"]] = "patch"
    multi_precision: ClassVar[bool] = False
    source_free: ClassVar[bool] = False
    # False for query (score-based) attacks: they only call the models, so any callable
    # images -> logits (an ONNX Runtime session, say) can be their source.
    needs_gradients: ClassVar[bool] = True
    default_steps: ClassVar[int] = 200
    default_lr: ClassVar[float] = 0.05
    default_eot: ClassVar[EOT] = EOT()
    # What a study records of any attack; attacks that fit or search a place fill them in.
    fit_curve: Sequence[Any] = ()
    """The last fit's curve (``universal_base.FitPoint``s); empty for attacks that learn nothing."""
    searched_location: tuple[int, int] | None = None
    """(top, left) where a placement search put the universal patch; None without a search."""

    def __init__(
        self,
        *,
        patch_size: int = 8,
        shape: str = "square",
        targeted: bool = False,
        target_class: int | None = None,
        steps: int | None = None,
        lr: float | None = None,
        batch_size: int = 128,
        eot: EOT | Mapping[str, Any] | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        self.patch_size = check_int("patch_size", patch_size, minimum=1)
        if shape not in MASK_SHAPES:
            raise ConfigError(
                f"unknown patch shape '{shape}'; choose from: {', '.join(MASK_SHAPES)}"
            )
        self.shape = shape
        if not isinstance(targeted, bool):
            raise ConfigError(f"targeted must be true or false, got {targeted!r}")
        if targeted and target_class is None:
            raise ConfigError("a targeted attack needs target_class")
        if not targeted and target_class is not None:
            raise ConfigError("target_class is only used with targeted=True")
        self.targeted = targeted
        self.target_class = (
            None if target_class is None else check_int("target_class", target_class, minimum=0)
        )
        self.steps = check_int("steps", self.default_steps if steps is None else steps, minimum=0)
        self.lr = check_positive("lr", self.default_lr if lr is None else lr)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.eot = EOT.coerce(eot, self.default_eot)
        self.seed = check_int("seed", seed, minimum=None)
        self.progress = bool(progress)

    # ----------------------------------------------------------------- public API
    def fit(self, models: Sequence[nn.Module], train: Split, device: torch.device | str) -> None:
        """Learn what ``perturb`` needs from ``train``; by default there is nothing to learn."""

    def perturb(
        self,
        models: Sequence[nn.Module],
        images: torch.Tensor,
        labels: torch.Tensor,
        device: torch.device | str,
    ) -> torch.Tensor:
        """Adversarial versions of ``images`` (same shape and device), deterministic per seed:
        ``batch_step`` on one batch of ``batch_size`` at a time, on ``device``."""
        check_inputs(images, labels)
        device = resolve_device(device)
        step = self.batch_step(models, images, device)
        out = []
        starts = range(0, len(images), self.batch_size)
        for start in tqdm(starts, desc=self.name, disable=not self.progress, leave=False):
            index = slice(start, start + self.batch_size)
            x = images[index].to(device, non_blocking=True)
            y = labels[index].to(device, non_blocking=True)
            out.append(step(x, y, index).detach().to(images.device))
        return torch.cat(out) if out else images.clone()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What ``fit`` learned, as tensors to save; ``{}`` when it learns nothing."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore a ``state_dict``; an attack that learns nothing accepts only ``{}``."""
        if state:
            raise ConfigError(f"{type(self).__name__} is per-image and holds no patch")

    def config(self) -> dict[str, Any]:
        """The effective constructor parameters (JSON-friendly), e.g. for records and cache keys."""
        out = {}
        for name in accepted_params(type(self))[0]:
            value = getattr(self, name, None)
            out[name] = value.to_dict() if isinstance(value, EOT) else value
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    # ----------------------------------------------------------------- what subclasses write
    def batch_step(
        self, models: Sequence[nn.Module], images: torch.Tensor, device: torch.device
    ) -> BatchStep:
        """Prepare ``perturb``'s run over ``images`` (all of them, still where the caller
        keeps them): the function that attacks one batch of them on ``device``."""
        raise NotImplementedError(f"{type(self).__name__} has no batch_step")

    # ----------------------------------------------------------------- helpers for subclasses
    def mask(self, device: torch.device | None = None) -> torch.Tensor | None:
        """The patch mask, or ``None`` for squares (the paste is then cheaper)."""
        return (
            None if self.shape == "square" else patch_mask(self.patch_size, self.shape).to(device)
        )

    def generator(self, purpose: str) -> torch.Generator:
        """A CPU generator seeded from ``(seed, purpose)``: fitting and evaluation draw
        independent streams, and every call restarts its stream (determinism)."""
        digest = hashlib.sha256(f"{self.seed}:{purpose}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def frozen_copies(self, models: Sequence[nn.Module], device: torch.device) -> list[nn.Module]:
        """Fast frozen eval-mode copies of ``models`` on ``device`` (BatchNorm folded,
        channels-last, see ``models.fast``; fake-quantized weights quantized once, see
        ``quant.freeze_weights``); the caller's models are left untouched."""
        models = list(models)
        if not models:
            raise ConfigError(f"{type(self).__name__} needs at least one source model")
        for m in models:
            if not isinstance(m, nn.Module):
                raise ConfigError(
                    f"{type(self).__name__} needs differentiable torch models, got {type(m).__name__}"
                )
        copies = [freeze_weights(fast_frozen_copy(m).to(device)) for m in models]
        for copy in copies:  # random draws (random precision), also inside a defence, start
            restart_draws(copy)  # afresh: an attack does not depend on what ran before it
        return copies

    def attack_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The class each image's loss refers to: the target class, or the true label."""
        if self.targeted:
            return torch.full_like(labels, int(self.target_class))  # type: ignore[arg-type]
        return labels

    def objective(
        self,
        models: Sequence[nn.Module],
        images: torch.Tensor,
        labels: torch.Tensor,
        reduction: Literal["mean", "none"] = "mean",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy of ``labels`` averaged over ``models``, per-image success).

        ``labels`` come from ``attack_labels``; ``reduction``: "mean" gives the batch-mean
        loss of universal fits, "none" one loss per image for per-image searches. Success is
        read off the same logits without gradient: every model misclassifies (targeted:
        every model says the target).
        """
        total = None
        fooled = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
        for model in models:
            logits = model(images)
            self._check_target(logits)
            ce = F.cross_entropy(logits, labels, reduction=reduction)
            total = ce if total is None else total + ce
            hit = logits.detach().argmax(dim=1) == labels
            fooled = fooled & (hit if self.targeted else ~hit)
        if total is None:
            raise ConfigError(f"{type(self).__name__} needs at least one source model")
        return (total if len(models) == 1 else total / len(models)), fooled

    def _check_target(self, logits: torch.Tensor) -> None:
        if self.targeted and self.target_class >= logits.shape[1]:  # type: ignore[operator]
            raise ConfigError(
                f"target_class {self.target_class} but the model has {logits.shape[1]} classes"
            )


def create_attack(name: str, **params: Any) -> Attack:
    """Build the attack registered as ``name`` (``ATTACKS.create``: one parameter check)."""
    return ATTACKS.create(name, **params)


def check_inputs(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.ndim != 4:
        raise ShapeError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ShapeError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")


def check_int(name: str, value: Any, minimum: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    return float(value)
