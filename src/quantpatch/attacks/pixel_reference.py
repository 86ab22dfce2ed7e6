"""Pixel-level L-inf attacks taken from torchattacks, behind quantpatch's attack interface.

``square-linf`` (Square Attack, Andriushchenko et al., ECCV 2020) is query-only: it reads
nothing but logits, so its source may be any callable images -> logits (an ONNX Runtime
session, say), and the study scores it as the query-only check on white-box pixel PGD.
``apgd-ce`` and ``apgd-dlr`` (Croce & Hein, ICML 2020) are the step-size-free white-box PGD of
AutoAttack, on the cross-entropy and on the scale-invariant DLR loss.

The attacks themselves are torchattacks' (optional: ``quantpatch[attacks]``, see pyproject);
this module only adapts them. Images stay in [0, 1] (normalisation belongs to the model), the
base class batches, and each batch runs under its own seed drawn from the attack's "perturb"
stream, with torch's global random state restored afterwards: torchattacks seeds and draws
from the global generator. Like the reference implementations, an image the attack does not
fool on its source comes back unchanged (clean), so only source successes can transfer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from quantpatch._runtime import resolve_device
from quantpatch.attacks.base import ATTACKS, Attack, BatchStep, check_int, check_positive
from quantpatch.attacks.per_image import PerImageAttack
from quantpatch.attacks.query import Predictor, query_functions, runtime_threads
from quantpatch.attacks.sparse_rs import check_share
from quantpatch.errors import ConfigError, MissingDependencyError

_SEED_RANGE = 2**31 - 1


def torchattacks_module() -> Any:
    """The torchattacks package, or one clear error saying how to install it."""
    try:
        import torchattacks
    except ImportError:
        raise MissingDependencyError(
            "square-linf and apgd-* need torchattacks: pip install --no-deps 'torchattacks>=3.5'"
            " (or quantpatch[attacks], which also pins an old requests)"
        ) from None
    return torchattacks


class ReferenceModel(nn.Module):
    """What torchattacks is handed: ``images -> logits`` as an ``nn.Module``.

    torchattacks reads its device from the model's first parameter, so the shim carries an
    empty one on ``device``. With ``gradients=False`` (a query attack) the wrapped callable runs
    under ``no_grad`` and may be anything, an ONNX Runtime session included. ``check`` sees
    every batch of logits (e.g. that a target class exists).
    """

    def __init__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
        *,
        gradients: bool,
        check: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.empty(0, device=device), requires_grad=False)
        self.model = model  # a submodule when it is one, so eval() reaches it
        self.gradients = gradients
        self.check = check

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.gradients:
            logits = self.model(images)
        else:
            with torch.no_grad():
                logits = self.model(images)
        if self.check is not None:
            self.check(logits)
        return logits


def run_seeded(
    reference: Any, images: torch.Tensor, labels: torch.Tensor, seed: int, device: torch.device
) -> torch.Tensor:
    """Run a torchattacks attack under ``seed`` and give torch's global random state back."""
    reference.seed = seed
    cuda = [torch.cuda.current_device()] if device.type == "cuda" else []
    if device.type == "cuda" and device.index is not None:
        cuda = sorted({*cuda, device.index})
    with torch.random.fork_rng(devices=cuda):
        return reference(images, labels).detach()


def batch_seed(generator: torch.Generator) -> int:
    """The next batch's torchattacks seed, from the attack's own seeded stream."""
    return int(torch.randint(_SEED_RANGE, (1,), generator=generator))


def single_source(models: Sequence[Any], name: str) -> Any:
    """The one source model: torchattacks attacks one model, not an ensemble."""
    if len(models) != 1:
        raise ConfigError(f"{name} attacks one source model, got {len(models)}")
    return models[0]


def check_rho(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(f"rho must be in (0, 1), got {value!r}")
    return float(value)


class APGD(PerImageAttack):
    """APGD (torchattacks' ``APGD``, L-inf): PGD whose step size starts at ``2 * eps`` and
    halves where the loss stalls or oscillates, with momentum; ``restarts`` random starts, each
    run only on images not yet fooled. White-box, untargeted, one source model.

    ``steps``: iterations per restart (AutoAttack's standard 100).
    """

    universal = False
    kind = "pixel"
    default_steps = 100
    loss: ClassVar[str] = ""

    def __init__(
        self,
        *,
        eps: float = 8 / 255,
        steps: int = 100,
        restarts: int = 1,
        rho: float = 0.75,
        batch_size: int = 128,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        torchattacks_module()  # refuse now, before any model is trained
        super().__init__(
            steps=check_int("steps", steps, minimum=1),
            batch_size=batch_size,
            seed=seed,
            progress=progress,
        )
        self.eps = check_positive("eps", eps)
        self.restarts = check_int("restarts", restarts, minimum=1)
        self.rho = check_rho(rho)

    def attack_batch(
        self,
        models: Sequence[nn.Module],
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        model = ReferenceModel(
            single_source(models, self.name), x.device, gradients=True, check=self._check_classes
        )
        reference = torchattacks_module().APGD(
            model, norm="Linf", eps=self.eps, steps=self.steps, n_restarts=self.restarts,
            loss=self.loss, rho=self.rho,
        )  # fmt: skip
        return run_seeded(reference, x, y, batch_seed(generator), x.device)

    def _check_classes(self, logits: torch.Tensor) -> None:
        if self.loss == "dlr" and logits.shape[1] < 3:
            raise ConfigError(f"apgd-dlr needs at least 3 classes, the model has {logits.shape[1]}")


@ATTACKS.register
class APGDCE(APGD):
    """APGD on the cross-entropy (AutoAttack's first attack)."""

    name = "apgd-ce"
    loss = "ce"


@ATTACKS.register
class APGDDLR(APGD):
    """APGD on the difference-of-logits-ratio loss, which rescaling the logits cannot flatten
    (so a saturated softmax does not hide the gradient)."""

    name = "apgd-dlr"
    loss = "dlr"


@ATTACKS.register
class SquareLinf(Attack):
    """Square Attack, L-inf (torchattacks' ``Square``, margin loss): random search over
    square-shaped +-eps updates whose size shrinks along the paper's schedule; query-only.

    ``queries``: search iterations per restart (torchattacks' ``n_queries``); each costs one
    query per image not yet fooled, on top of one for the start. ``p_init``: the share of the
    image the first squares cover. Targeted mode takes ``target_class``.
    """

    name = "square-linf"
    universal = False
    kind = "pixel"
    needs_gradients = False
    default_steps = 0

    def __init__(
        self,
        *,
        eps: float = 8 / 255,
        queries: int = 5000,
        restarts: int = 1,
        p_init: float = 0.8,
        targeted: bool = False,
        target_class: int | None = None,
        batch_size: int = 128,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        torchattacks_module()
        super().__init__(
            targeted=targeted, target_class=target_class, batch_size=batch_size, seed=seed,
            progress=progress,
        )  # fmt: skip
        self.eps = check_positive("eps", eps)
        self.queries = check_int("queries", queries, minimum=1)
        self.restarts = check_int("restarts", restarts, minimum=1)
        self.p_init = check_share("p_init", p_init)

    def batch_step(
        self, models: Sequence[Predictor], images: torch.Tensor, device: torch.device
    ) -> BatchStep:
        del images
        device = resolve_device(device)
        source = single_source(models, self.name)
        (query,) = query_functions([source], device)
        model = ReferenceModel(query, device, gradients=False, check=self._check_target)
        reference = torchattacks_module().Square(
            model, norm="Linf", eps=self.eps, n_queries=self.queries, n_restarts=self.restarts,
            p_init=self.p_init, loss="margin", resc_schedule=True,
        )  # fmt: skip
        if self.targeted:
            reference.set_mode_targeted_by_label(quiet=True)
        generator = self.generator("perturb")

        def step(x: torch.Tensor, y: torch.Tensor, _: slice) -> torch.Tensor:
            with runtime_threads([source]):
                return run_seeded(reference, x, self.attack_labels(y), batch_seed(generator),
                                  device)  # fmt: skip

        return step
