"""The ``Attack`` base class, the registry and ``create_attack``.

Like torchattacks, the base owns the boring parts: parameter checks, device and eval mode,
freezing the models, targeted labels, the objective averaged over several models, seeding,
batching, the universal fit (EOT + Adam) and paste, and (``PerImageAttack``) the per-image
search loop. A universal attack only states its defaults; a per-image attack writes only
``attack_batch`` (its start and its update step).
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quantpatch._registry import Registry
from quantpatch._runtime import resolve_device, restart_draws
from quantpatch.attacks.placement import (
    EOT,
    MASK_SHAPES,
    Placement,
    apply_patch,
    make_canvas,
    patch_mask,
    prepare_paste,
    sample_placement,
)
from quantpatch.data._types import Split
from quantpatch.errors import ConfigError, CorruptFileError, QuantpatchError, ShapeError
from quantpatch.models.fast import fast_frozen_copy

ATTACKS: Registry = Registry("attack")
"""Attack classes by name; ``create_attack(name, **params)`` builds one."""

# Success outranks any loss value when keeping the best adversarial example per image.
SUCCESS_BONUS = 1e6
# Move the whole train split to the device once when it is at most this large.
_RESIDENT_BYTES = 1 << 30
# About this many points per fit curve (each the mean over the steps since the last one).
FIT_CURVE_POINTS = 20

BatchStep = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]
Render = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class FitPoint(NamedTuple):
    """One point of a universal fit's curve, averaged over the steps since the previous point.

    ``step``: steps done so far; ``loss``: mean batch loss (the cross-entropy the fit
    minimises when targeted and maximises otherwise, averaged over the models); ``success``:
    share of those steps' patched training images that every model misclassifies (targeted:
    classifies as the target). Clean-wrong images count too, so it is a training signal close
    to, not the same as, the evaluated ASR.
    """

    step: int
    loss: float
    success: float


class Attack:
    """Base class: universal attacks learn a patch in ``fit``; per-image ones work in ``perturb``.

    Common parameters: ``patch_size`` (px), ``shape`` ("square" | "circle"), ``targeted`` and
    ``target_class``, ``steps``, ``lr`` (step size), ``batch_size``, ``eot`` (placement ranges;
    an ``EOT`` or a dict), ``seed`` and ``progress`` (tqdm bars). ``steps``/``lr``/``eot`` left
    as ``None`` take the attack's own defaults. Pixel attacks ignore the patch settings.
    """

    name: ClassVar[str] = ""
    universal: ClassVar[bool] = True
    kind: ClassVar[Literal["patch", "pixel"]] = "patch"
    multi_precision: ClassVar[bool] = False
    source_free: ClassVar[bool] = False
    # False for query (score-based) attacks: they only call the models, so any callable
    # images -> logits (an ONNX Runtime session, say) can be their source.
    needs_gradients: ClassVar[bool] = True
    default_steps: ClassVar[int] = 200
    default_lr: ClassVar[float] = 0.05
    default_eot: ClassVar[EOT] = EOT()
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
        self.patch: torch.Tensor | None = None
        self.fit_curve: list[FitPoint] = []
        """The last fit's curve (``learn_patch``); empty before a fit or when loaded from a
        state without one."""

    # ----------------------------------------------------------------- public API
    def fit(self, models: Sequence[nn.Module], train: Split, device: torch.device | str) -> None:
        """Learn the universal patch on ``train`` (per-image attacks: nothing to learn)."""
        if self.universal:
            self.patch = self.learn_patch(models, train, device)

    def perturb(
        self,
        models: Sequence[nn.Module],
        images: torch.Tensor,
        labels: torch.Tensor,
        device: torch.device | str,
    ) -> torch.Tensor:
        """Adversarial versions of ``images`` (same shape and device), deterministic per seed.

        Universal attacks paste the learned patch at seeded ``paste_eot`` placements and ignore
        ``models`` (so every target model of a transfer grid sees the same images); per-image
        attacks run ``attack_batch`` on frozen copies of ``models``, one batch at a time.
        """
        check_inputs(images, labels)
        device = resolve_device(device)
        step = (
            self._paste_step(images, device)
            if self.universal
            else self._attack_step(models, device)
        )
        out = []
        starts = range(0, len(images), self.batch_size)
        for start in tqdm(starts, desc=self.name, disable=not self.progress, leave=False):
            index = slice(start, start + self.batch_size)
            x = images[index].to(device, non_blocking=True)
            y = labels[index].to(device, non_blocking=True)
            out.append(step(x, y, index).detach().to(images.device))
        return torch.cat(out) if out else images.clone()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"patch": (C, p, p), "fit_curve": (K, 3) float64 rows (step, loss, success)}``
        once a universal patch exists (the curve only when one was recorded), else ``{}``."""
        if self.patch is None:
            return {}
        state = {"patch": self.patch.detach().cpu().clone()}
        if self.fit_curve:
            state["fit_curve"] = torch.tensor(self.fit_curve, dtype=torch.float64)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore a patch saved by ``state_dict`` (shape and range are checked)."""
        if not self.universal:
            if state:
                raise ConfigError(f"{type(self).__name__} is per-image and holds no patch")
            return
        patch = state.get("patch")
        p = self.patch_size
        if not isinstance(patch, torch.Tensor) or patch.ndim != 3 or patch.shape[1:] != (p, p):
            shape = tuple(patch.shape) if isinstance(patch, torch.Tensor) else None
            raise ShapeError(f"state must hold a (C, {p}, {p}) 'patch', got {shape}")
        if not bool(torch.isfinite(patch).all()) or patch.min() < 0 or patch.max() > 1:
            raise CorruptFileError("patch values must be finite and in [0, 1]")
        curve = _fit_curve_from(state.get("fit_curve"))
        self.patch = patch.detach().float().cpu().clone()
        self.fit_curve = curve

    @classmethod
    def accepted_params(cls) -> list[str]:
        """Keyword arguments the constructor takes (walks ``**kwargs`` up the class chain)."""
        names: list[str] = []
        for klass in cls.__mro__:
            if "__init__" not in vars(klass) or klass is object:
                continue
            params = inspect.signature(vars(klass)["__init__"]).parameters.values()
            names += [
                p.name
                for p in params
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
                and p.name != "self"
                and p.name not in names
            ]
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
        return names

    def config(self) -> dict[str, Any]:
        """The effective constructor parameters (JSON-friendly), e.g. for records and cache keys."""
        out = {}
        for name in self.accepted_params():
            value = getattr(self, name, None)
            out[name] = value.to_dict() if isinstance(value, EOT) else value
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    # ----------------------------------------------------------------- what subclasses change
    @property
    def paste_eot(self) -> EOT:
        """Where ``perturb`` pastes a universal patch: by default where it was learned."""
        return self.eot

    def attack_batch(
        self,
        models: Sequence[nn.Module],
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Per-image attacks: adversarial versions of one batch ``x`` (on the device).

        ``models`` are frozen fast copies; ``y`` are the ``attack_labels``; ``generator`` is
        the seeded "perturb" stream, shared by the batches in order.
        """
        raise NotImplementedError(f"{type(self).__name__} is per-image but has no attack_batch")

    def learn_patch(
        self, models: Sequence[nn.Module], train: Split, device: torch.device | str
    ) -> torch.Tensor:
        """Learn a (C, p, p) patch on ``train``: Adam on the batch-mean cross-entropy averaged
        over ``models`` (of the target class when targeted, else of the true class, maximised)
        and over placements drawn from ``eot``; returns it on the CPU and keeps the fit's
        curve in ``fit_curve``. ``choose_placement`` runs first (a subclass may fix where the
        patch goes, e.g. LaVAN's location search).
        """
        device = resolve_device(device)
        if len(train) == 0:
            raise ShapeError("cannot fit a universal patch on an empty train split")
        frozen = self.frozen_copies(models, device)
        self.choose_placement(frozen, train, device)
        patch, self.fit_curve = self.fit_patch(
            frozen, train, device, self.eot, self.steps, self.generator("fit")
        )
        return patch

    def choose_placement(
        self, models: Sequence[nn.Module], train: Split, device: torch.device
    ) -> None:
        """Called by ``learn_patch`` before the fit with frozen ``models``: by default the
        patch is learned where ``eot`` says."""

    def fit_patch(
        self,
        models: Sequence[nn.Module],
        train: Split,
        device: torch.device,
        eot: EOT,
        steps: int,
        gen: torch.Generator,
    ) -> tuple[torch.Tensor, list[FitPoint]]:
        """The universal fit itself on frozen ``models``: (patch on the CPU, its curve).

        All randomness is drawn up front from ``gen``, so the loop itself is just paste +
        forward + backward. The curve is summed on the device and read every
        ``ceil(steps / FIT_CURVE_POINTS)`` steps, so recording it neither draws random numbers
        nor changes the patch.
        """
        _, channels, height, width = train.images.shape
        p, batch = self.patch_size, self.batch_size
        patch = torch.rand(channels, p, p, generator=gen)
        index = torch.randint(len(train), (steps, batch), generator=gen)
        placements = sample_placement(steps * batch, (height, width), p, eot, gen)
        plan = prepare_paste(placements, (height, width), p, device)
        images, labels = _resident(train, device)
        index = index.to(images.device)
        labels = self.attack_labels(labels[index].to(device))  # (steps, batch), gathered once
        patch = patch.to(device).requires_grad_(True)
        mask = self.mask(device)
        optimizer = torch.optim.Adam(
            [patch], lr=self.lr, maximize=not self.targeted, fused=device.type == "cuda"
        )
        every = max(1, math.ceil(steps / FIT_CURVE_POINTS))
        curve: list[FitPoint] = []
        window_loss = torch.zeros((), dtype=torch.float64, device=device)
        window_hits = torch.zeros((), dtype=torch.int64, device=device)
        bar = tqdm(total=steps, desc=f"fit {self.name}", disable=not self.progress, leave=False)
        with bar:
            for step in range(steps):
                x = images[index[step]].to(device, non_blocking=True)
                adv = plan[step * batch : (step + 1) * batch](x, make_canvas(patch, mask))
                loss, fooled = self.fit_objective(models, adv, labels[step])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    patch.clamp_(0.0, 1.0)
                    window_loss += loss.detach()
                    window_hits += fooled.sum()
                if (step + 1) % every == 0 or step == steps - 1:
                    done = step + 1 - (curve[-1].step if curve else 0)
                    curve.append(FitPoint(step + 1, float(window_loss) / done,
                                          int(window_hits) / (done * batch)))  # fmt: skip
                    window_loss.zero_()
                    window_hits.zero_()
                if self.progress and (step % 25 == 0 or step == steps - 1):
                    bar.set_postfix(ce=f"{float(loss):.3f}", refresh=False)
                bar.update(1)
        return patch.detach().cpu(), curve

    # ----------------------------------------------------------------- the two perturb steps
    def _paste_step(self, images: torch.Tensor, device: torch.device) -> BatchStep:
        """Paste ``self.patch`` at placements drawn from ``paste_eot`` with the seeded
        "perturb" stream: image i's placement depends only on the seed and i."""
        patch = require_patch(self, images).to(device)
        _, _, height, width = images.shape
        placements = sample_placement(
            len(images), (height, width), self.patch_size, self.paste_eot, self.generator("perturb")
        )
        mask = self.mask(device)

        @torch.no_grad()
        def paste(x: torch.Tensor, _: torch.Tensor, index: slice) -> torch.Tensor:
            return apply_patch(x, patch, placements[index], mask)

        return paste

    def _attack_step(self, models: Sequence[nn.Module], device: torch.device) -> BatchStep:
        frozen = self.frozen_copies(models, device)
        generator = self.generator("perturb")
        return lambda x, y, _: self.attack_batch(frozen, x, self.attack_labels(y), generator)

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
        channels-last; see ``models.fast``); the caller's models are left untouched."""
        models = list(models)
        if not models:
            raise ConfigError(f"{type(self).__name__} needs at least one source model")
        for m in models:
            if not isinstance(m, nn.Module):
                raise ConfigError(
                    f"{type(self).__name__} needs differentiable torch models, got {type(m).__name__}"
                )
        copies = [fast_frozen_copy(m).to(device) for m in models]
        for copy in copies:  # random draws (random precision), also inside a defence, start
            restart_draws(copy)  # afresh: an attack does not depend on what ran before it
        return copies

    def attack_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The class each image's loss refers to: the target class, or the true label."""
        if self.targeted:
            return torch.full_like(labels, int(self.target_class))  # type: ignore[arg-type]
        return labels

    def fit_objective(
        self, models: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch-mean cross-entropy averaged over ``models``, per-image success): the lean
        loss of universal fits (minimise it when targeted, maximise it otherwise) and, read
        off the same logits without gradient, whether every model is fooled (targeted: says
        the target)."""
        total = None
        fooled = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
        for model in models:
            logits = model(images)
            self._check_target(logits)
            ce = F.cross_entropy(logits, labels)
            total = ce if total is None else total + ce
            hit = logits.detach().argmax(dim=1) == labels
            fooled = fooled & (hit if self.targeted else ~hit)
        assert total is not None
        return (total if len(models) == 1 else total / len(models)), fooled

    def _check_target(self, logits: torch.Tensor) -> None:
        if self.targeted and self.target_class >= logits.shape[1]:  # type: ignore[operator]
            raise ConfigError(
                f"target_class {self.target_class} but the model has {logits.shape[1]} classes"
            )


class PerImageAttack(Attack):
    """Base of per-image attacks: ``attack_batch`` optimises each image's own perturbation.

    ``early_stop``: drop an image from the batch at its first success. Faster, but the example
    then sits just past the decision boundary, which understates how well it transfers; by
    default every step (and restart) runs and each image keeps the successful example with
    the highest loss (success still outranks any loss).
    """

    universal = False

    def __init__(self, *, early_stop: bool = False, **common: Any) -> None:
        super().__init__(**common)
        if not isinstance(early_stop, bool):
            raise ConfigError(f"early_stop must be true or false, got {early_stop!r}")
        self.early_stop = early_stop

    def running(self, key: torch.Tensor) -> torch.Tensor:
        """Which images (by their best key so far) still get steps: all, or with
        ``early_stop`` the ones not yet successful."""
        if self.early_stop:
            return key < SUCCESS_BONUS / 2
        return torch.ones_like(key, dtype=torch.bool)

    def random_patches(
        self, x: torch.Tensor, generator: torch.Generator, placement: Placement | None = None
    ) -> tuple[torch.Tensor, Render]:
        """A uniform-noise patch per image at ``placement`` (default: drawn from ``eot``), and
        the render ``(rows, idx) -> images idx with their patch rows pasted`` for ``search``."""
        n, c, height, width = x.shape
        p = self.patch_size
        if placement is None:
            placement = sample_placement(n, (height, width), p, self.eot, generator)
        render = self.patch_render(x, placement)
        return torch.rand(n, c, p, p, generator=generator).to(x.device), render

    def patch_render(self, x: torch.Tensor, placement: Placement) -> Render:
        """``(rows, idx) -> images idx with patches rows pasted at their placements``."""
        plan = prepare_paste(placement, tuple(x.shape[-2:]), self.patch_size, x.device)
        mask = self.mask(x.device)

        def render(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return plan[idx](x[idx], make_canvas(rows, mask))

        return render

    def objective(
        self, models: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image (score to maximise, success) averaged over ``models``.

        ``labels`` come from ``attack_labels``. Untargeted: score = CE of the true class and
        success = every model misclassifies; targeted: score = -CE of the target class and
        success = every model predicts the target.
        """
        score = images.new_zeros(images.shape[0])
        success = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
        for model in models:
            logits = model(images)
            self._check_target(logits)
            score = score + F.cross_entropy(logits, labels, reduction="none")
            hit = logits.detach().argmax(dim=1) == labels
            success = success & (hit if self.targeted else ~hit)
        score = score / len(models)
        return (-score if self.targeted else score), success

    def search(
        self,
        models: Sequence[nn.Module],
        labels: torch.Tensor,
        variable: torch.Tensor,
        render: Render,
        update: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor],
        steps: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image gradient ascent on ``variable`` (row i belongs to image i) for ``steps``
        (default ``self.steps``) steps; returns the best adversarial images seen and their keys
        (score, plus a bonus once successful).

        With ``early_stop`` only images that have not yet succeeded on every model stay in the
        batch, so a few hard images do not keep the whole batch busy. ``render(rows, idx)``
        builds the adversarial images ``idx`` from their rows of ``variable``; ``update(rows,
        grad, idx, step)`` returns the new rows (ascending the score). ``variable`` is updated
        in place.
        """
        active = torch.arange(len(labels), device=labels.device)
        best_key = torch.full((len(labels),), -torch.inf, device=labels.device)
        best_adv: torch.Tensor | None = None
        steps = self.steps if steps is None else steps
        for step in range(steps + 1):
            rows = variable[active].requires_grad_(True)
            adv = render(rows, active)
            score, success = self.objective(models, adv, labels[active])
            with torch.no_grad():
                key = score.detach() + success.to(score.dtype) * SUCCESS_BONUS
                if best_adv is None:
                    best_adv = torch.empty_like(adv)
                better = key > best_key[active]
                best_adv[active[better]] = adv.detach()[better]
                best_key[active[better]] = key[better]
                keep = self.running(best_key[active])
            if step == steps or not bool(keep.any()):
                break
            (grad,) = torch.autograd.grad(score.sum(), rows)
            with torch.no_grad():
                active, rows, grad = active[keep], rows.detach()[keep], grad[keep]
                variable[active] = update(rows, grad, active, step)
        assert best_adv is not None
        return best_adv, best_key


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


def _fit_curve_from(value: Any) -> list[FitPoint]:
    """A saved (K, 3) curve back as points (absent: no curve); anything else is refused."""
    if value is None:
        return []
    if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.shape[1] != 3:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        raise ShapeError(
            f"a saved fit_curve must be (K, 3) rows (step, loss, success), got {shape}"
        )
    rows = value.detach().double().cpu()
    steps, success = rows[:, 0], rows[:, 2]
    if (
        not bool(torch.isfinite(rows).all())
        or bool((steps != steps.round()).any() or (steps < 1).any())
        or bool((steps[1:] <= steps[:-1]).any())
        or bool((success < 0).any() or (success > 1).any())
    ):
        raise CorruptFileError("fit_curve needs increasing whole steps and successes in [0, 1]")
    return [FitPoint(int(step), float(loss), float(hit)) for step, loss, hit in rows.tolist()]


def _resident(train: Split, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split on ``device`` when it is small enough, else left where it is (batches move)."""
    if train.images.numel() * train.images.element_size() <= _RESIDENT_BYTES:
        return train.images.to(device), train.labels.to(device)
    return train.images, train.labels


def create_attack(name: str, **params: Any) -> Attack:
    """Build the attack registered as ``name``; unknown parameters raise ``ConfigError``."""
    cls = ATTACKS.get(name)
    accepted = cls.accepted_params()
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"attack '{name}' does not take {', '.join(unknown)}; it takes: {', '.join(accepted)}"
        )
    return cls(**params)


def require_patch(attack: Attack, images: torch.Tensor) -> torch.Tensor:
    """The learned patch, checked against the images' channels."""
    if attack.patch is None:
        raise QuantpatchError(f"{type(attack).__name__}: call fit() or load_state_dict() first")
    if attack.patch.shape[0] != images.shape[1]:
        raise ShapeError(
            f"the patch has {attack.patch.shape[0]} channels, images have {images.shape[1]}"
        )
    return attack.patch
