"""The study's shared types: prepared models, targets, cells and the context a run hands to
every stage (with the artifact cache of ``study.cache``). They live apart from the stages (artifacts, cells,
analyses, records, runner) so that no stage imports another just for a type."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from quantpatch.data import Dataset, Split
from quantpatch.quant import QuantSpec
from quantpatch.results import ModelRecord
from quantpatch.study.cache import ArtifactCache
from quantpatch.study.config import AttackSettings, StudyConfig


@dataclass(frozen=True, eq=False)
class PreparedModel:
    """A trained (and possibly quantized) PyTorch model plus what identifies it."""

    arch: str
    spec: QuantSpec
    module: nn.Module
    key: str
    tag: str = ""
    """Set on controls: 'ft' is the fp32 model fine-tuned like the QAT models."""
    defense: str | None = None
    """Set on adaptive attack sources: the label of the input defence ``module`` holds."""
    recipe: str | None = None
    """Set on the models of a training defence: the recipe's label."""
    label: str | None = None
    """Replaces the precision label where ``spec`` does not say how it runs (a training
    defence served at a random precision: 'random-<recipe>')."""

    @property
    def precision(self) -> str:
        if self.label:
            return self.label
        return f"{self.spec.name}-{self.tag}" if self.tag else self.spec.name

    @property
    def name(self) -> str:
        return defended_name(f"{self.arch}/{self.precision}", self.defense)


def defended_name(model: str, defense: str | None) -> str:
    """'<arch>/<precision>' behind a defence: '<arch>/<precision>+<defence label>'."""
    return f"{model}+{defense}" if defense else model


Predictor = Callable[[torch.Tensor], torch.Tensor]
Runtime = Literal["torch", "onnxruntime"]
AdaptiveVia = Literal["exact", "bpda", "underlying-model"]
"""Gradients through a differentiable defence, straight-through (BPDA) ones through a
non-differentiable one, or none: a forward-only defence's adaptive attack is the white-box
attack on the model behind it."""


@dataclass(eq=False)
class Target:
    """Anything a patch is evaluated on: a name, a logits function and its clean predictions.

    ``precision`` is the label in results ('w4a4', 'ort-int8'), ``spec`` the arithmetic it
    runs; ``model`` is the PyTorch model behind it, None for other runtimes (ONNX Runtime)."""

    arch: str
    precision: str
    spec: QuantSpec
    runtime: Runtime
    predict: Predictor
    key: str
    model: PreparedModel | None = None
    clean_pred: torch.Tensor | None = field(default=None, repr=False)
    defense: str | None = None
    """The label of the defence in front of the model; None: undefended."""
    adaptive_via: AdaptiveVia | None = None
    """How an adaptive attack sees the defence (None when undefended)."""

    @property
    def base_name(self) -> str:
        """The undefended model's name."""
        return f"{self.arch}/{self.precision}"

    @property
    def name(self) -> str:
        return defended_name(self.base_name, self.defense)

    def predict_labels(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict(images).argmax(dim=1)


@dataclass(frozen=True, eq=False)
class Source:
    """What a cell's attack is crafted on: one model, every precision of one architecture
    (``multibit``), or nothing (``random``)."""

    label: str
    arch: str | None
    precision: str | None
    models: tuple[PreparedModel, ...]
    deployed: Target | None = None
    """Set for a query attack crafted on a runtime target (ONNX Runtime): its logits are all
    the attack sees."""

    @classmethod
    def single(cls, model: PreparedModel) -> Source:
        return cls(model.name, model.arch, model.precision, (model,))

    @classmethod
    def of_target(cls, target: Target) -> Source:
        """A target as a query attack's source: its PyTorch model where it has one (the same
        source, and cache key, as a gradient attack's), else its logits function."""
        if target.model is not None:
            return cls.single(target.model)
        return cls(target.name, target.arch, target.precision, (), target)

    def predictors(self) -> list:
        """What the attack is given: PyTorch modules, or the runtime's logits function."""
        if self.deployed is not None:
            return [self.deployed.predict]
        return [model.module for model in self.models]

    @classmethod
    def ensemble(cls, arch: str, models: tuple[PreparedModel, ...]) -> Source:
        return cls(f"{arch}/multibit", arch, "multibit", models)

    @classmethod
    def none(cls) -> Source:
        return cls("none", None, None, ())

    @property
    def keys(self) -> list[str]:
        if self.deployed is not None:
            return [self.deployed.key]
        return [model.key for model in self.models]

    @property
    def defense(self) -> str | None:
        """The input defence an adaptive source attacks through (None: an undefended source)."""
        return self.models[0].defense if len(self.models) == 1 else None


@dataclass(frozen=True, eq=False)
class Cell:
    """(source, attack, patch size, seed); ``key`` hashes everything its numbers depend on."""

    source: Source
    attack: AttackSettings
    patch_size: int | None
    seed: int
    key: str

    @property
    def cell_id(self) -> str:
        size = f"p{self.patch_size}" if self.patch_size else "pixel"
        raw = f"{self.source.label}__{self.attack.label}__{size}__s{self.seed}"
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", raw) + f"__{self.key[:8]}"


@dataclass
class StudyContext:
    """Everything a stage of a run needs, prepared once: config, data, cache, models, targets."""

    config: StudyConfig
    out: Path
    device: torch.device
    dataset: Dataset
    cache: ArtifactCache
    progress: bool = True
    eval: Split = field(init=False, repr=False)
    models: dict[str, PreparedModel] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    model_records: list[ModelRecord] = field(default_factory=list)
    control_of: dict[str, list[str]] = field(default_factory=dict)
    """Control name -> the quantized models whose QAT schedule it repeats in float."""
    adaptive_sources: dict[str, PreparedModel] = field(default_factory=dict)
    """Defended target name -> its model behind the input defence, as an attack source."""

    def __post_init__(self) -> None:
        # a seeded, stratified subset: test files are often sorted by class
        self.eval = self.dataset.test.stratified(self.config.n_eval, self.config.data_seed)

    @property
    def eval_images(self) -> torch.Tensor:
        return self.eval.images

    @property
    def eval_labels(self) -> torch.Tensor:
        return self.eval.labels

    def calibration_images(self, n: int) -> torch.Tensor:
        """A seeded, stratified subset of the training images (the same for every user)."""
        return self.dataset.train.stratified(n, self.config.data_seed).images

    def fp32(self, arch: str) -> PreparedModel:
        return self.models[f"{arch}/fp32"]

    def siblings(self, arch: str) -> tuple[PreparedModel, ...]:
        """Every PyTorch precision of one architecture (the multibit attack's sources);
        controls are not precisions."""
        return tuple(m for m in self.models.values() if m.arch == arch and not m.tag)

    def controls(self, arch: str) -> tuple[PreparedModel, ...]:
        return tuple(m for m in self.models.values() if m.arch == arch and m.tag)

    def data_identity(self) -> dict[str, Any]:
        """What identifies the training data in cache keys."""
        return {
            "dataset": self.dataset.name,
            "limit": self.config.limit,
            "seed": self.config.data_seed,
            "shape": list(self.dataset.train.images.shape[1:]),
            "n_train": len(self.dataset.train),
        }

    def model_record(self, name: str) -> ModelRecord:
        return next(r for r in self.model_records if r.name == name)
