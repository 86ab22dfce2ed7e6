"""The threat model, every rule of it: what each attack is crafted on, which targets a cell's
images are scored on, and what each (cell, target) pair is called in results.

White-box: crafted on the target itself. Query-only: a score-based attack that saw only the
target's outputs (any runtime). Transfer: crafted on another model. Adaptive: crafted knowing
the target's defence (through it, or on the model behind a forward-only one)."""

from __future__ import annotations

from dataclasses import dataclass

from quantpatch.attacks import Attack
from quantpatch.quant.switchable import attack_members
from quantpatch.study.settings.config import AttackSettings
from quantpatch.study.settings.names import CERTIFIABLE_TAG, FP32, model_name
from quantpatch.study.zoo.context import PreparedModel, StudyContext, Target


@dataclass(frozen=True, eq=False)
class Source:
    """What a cell's attack is crafted on: one model, every precision of one architecture
    (``multibit``), or nothing (``random``)."""

    label: str
    arch: str | None
    precision: str | None
    models: tuple[PreparedModel, ...]
    deployed: Target | None = None
    """Set for a query attack crafted on a runtime target (ONNX Runtime) or through a
    defended target's decision: its scores are all the attack sees."""

    @classmethod
    def single(cls, model: PreparedModel) -> Source:
        return cls(model.name, model.arch, model.precision, (model,))

    @classmethod
    def of_target(cls, target: Target) -> Source:
        """A target as a query attack's source: its PyTorch model where it has one (the same
        source, and cache key, as a gradient attack's), else its logits function."""
        if target.model is not None and target.defense is None:
            return cls.single(target.model)
        return cls(target.name, target.arch, target.precision, (), target)

    def predictors(self, attack: Attack) -> list:
        """What ``attack`` is given: PyTorch modules, or the runtime's logits function. A
        gradient attack on a random-precision model gets its members (the exact expectation
        over its draws); a query attack sees the model as served."""
        if self.deployed is not None:
            return [self.deployed.predict]
        if not attack.needs_gradients:
            return [model.module for model in self.models]
        return [m for model in self.models for m in attack_members(model.module)]

    @classmethod
    def ensemble(cls, arch: str, models: tuple[PreparedModel, ...]) -> Source:
        return cls(model_name(arch, "multibit"), arch, "multibit", models)

    @classmethod
    def none(cls) -> Source:
        return cls("none", None, None, ())

    @property
    def keys(self) -> list[str]:
        if self.deployed is not None:
            return [self.deployed.key]
        return [model.key for model in self.models]

    @property
    def free(self) -> bool:
        """Crafted on no model at all (the random patch)."""
        return not self.models and self.deployed is None

    @property
    def defense(self) -> str | None:
        """The defence an adaptive source attacks through (None: an undefended source)."""
        if self.deployed is not None:
            return self.deployed.defense
        return self.models[0].defense if len(self.models) == 1 else None


def sources_for(context: StudyContext, cls: type[Attack], settings: AttackSettings) -> list[Source]:
    """What an attack is crafted on: nothing, each architecture's precisions together, or
    every model on its own (only the precisions ``settings.sources`` names, when it does).
    A query attack needs only outputs, so any undefended target is its source, deployed
    runtimes included; a gradient attack needs a PyTorch model."""
    if cls.source_free:
        return [Source.none()]
    if cls.multi_precision:
        return [Source.ensemble(arch, context.siblings(arch)) for arch in context.config.models]
    chosen = settings.sources
    if not cls.needs_gradients:
        return [
            Source.of_target(target)
            for target in context.targets
            if target.defense is None and (chosen is None or target.precision in chosen)
        ]  # (through a defence: adaptive_sources_for)
    return [
        Source.single(model)
        for model in context.models.values()
        if chosen is None or model.precision in chosen
    ]


def adaptive_sources_for(
    context: StudyContext, cls: type[Attack], settings: AttackSettings
) -> list[Source]:
    """The adaptive cells' sources, the defence included. A gradient attack: one per defended
    PyTorch target, white-box through an input defence or through a certifier's
    differentiable surrogate (a forward-only defence without one has none: its adaptive
    attack is the undefended model's, already in the grid). A query attack: every defended
    target, any runtime, through the defence's real decision (``Defense.scores``). None for
    attacks that use no model or several (multibit), or that the study marks
    ``adaptive: false``."""
    if cls.source_free or cls.multi_precision or not settings.adaptive:
        return []
    chosen = settings.sources
    if not cls.needs_gradients:
        return [
            Source.of_target(target)
            for target in context.targets
            if target.defense is not None and (chosen is None or _named(target, chosen))
        ]
    return [
        Source.single(model)
        for model in context.adaptive_sources.values()
        if chosen is None or model.precision in chosen
        or (model.tag == CERTIFIABLE_TAG and model.spec.name in chosen)  # 'fp32' takes fp32-cert
    ]  # fmt: skip


def _named(target: Target, chosen: list[str]) -> bool:
    """``sources:`` names a defended target by its model's precision ('fp32' also takes
    'fp32-cert', as for gradient attacks)."""
    untagged = target.precision.removesuffix(f"-{CERTIFIABLE_TAG}")
    return target.precision in chosen or untagged in chosen


def scored_targets(context: StudyContext, source: Source) -> list[Target]:
    """Which targets the images crafted on ``source`` are scored on.

    An adaptive source: only the defended target it was crafted through. Otherwise every
    undefended target, and a defended target only when the cell is its non-adaptive attack
    (crafted on the model behind the defence, on that architecture's fp32 model, or on no
    model): defended targets cost up to hundreds of forwards per image (PatchCleanser), and
    transfer from another bit-width *through* a defence answers no question the study asks."""
    if source.defense is not None:
        return [t for t in context.targets if t.name == source.label]
    return [t for t in context.targets if t.defense is None or _attacks_behind(source, t)]


def _attacks_behind(source: Source, target: Target) -> bool:
    if source.free:
        return True
    return source.label == target.base_name or (
        source.arch == target.arch and source.precision == FP32
    )


def is_adaptive(source: Source, attack: Attack, target: Target) -> bool:
    """Crafted knowing the target's defence: through it, or (forward-only defence, gradient
    attack) on the model behind it. A query attack on the model behind a forward-only
    defence never queried the defence, so it is not adaptive."""
    if target.defense is None:
        return False
    if target.adaptive_via == "underlying-model" and attack.needs_gradients:
        return source.label == target.base_name
    return source.label == target.name


def adaptive_via(attack: Attack, target: Target) -> str | None:
    """How an adaptive attack saw the defence: a query attack only through its outputs."""
    return target.adaptive_via if attack.needs_gradients else "queries"


def threat(source: Source, attack: Attack, target: Target) -> str:
    """The threat model of images crafted on ``source`` by ``attack``, scored on ``target``."""
    if source.free:
        return "source-free"
    if source.label == target.name or is_adaptive(source, attack, target):
        return "white-box" if attack.needs_gradients else "query-only"
    if target.defense is not None:
        return "transfer"  # crafted without the defence: non-adaptive
    if target.model is not None and target.model in source.models:
        return "white-box ensemble"
    return "transfer"
