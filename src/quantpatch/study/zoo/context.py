"""What the zoo holds: prepared models, the targets built on them, and the context that carries
them (with the data, the settings and the artifact cache) to every later stage."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantpatch.data import Dataset, Split
from quantpatch.quant import QuantSpec
from quantpatch.results import ModelRecord
from quantpatch.study.settings.config import StudyConfig
from quantpatch.study.settings.names import FP32, defended_name, model_name, tagged
from quantpatch.study.store.cache import ArtifactCache


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
        return self.label or tagged(self.spec.name, self.tag)

    @property
    def name(self) -> str:
        return defended_name(model_name(self.arch, self.precision), self.defense)


Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass(eq=False)
class Target:
    """Anything a patch is evaluated on: a name, a logits function and its clean predictions.

    ``precision`` is the label in results ('w4a4', 'ort-int8'), ``spec`` the arithmetic it
    runs, ``runtime`` what runs it ('torch', or a deployment's runtime); ``model`` is the
    PyTorch model behind it, None for other runtimes."""

    arch: str
    precision: str
    spec: QuantSpec
    runtime: str
    predict: Predictor
    key: str
    model: PreparedModel | None = None
    clean_pred: torch.Tensor | None = field(default=None, repr=False)
    defense: str | None = None
    """The label of the defence in front of the model; None: undefended."""
    adaptive_via: str | None = None
    """How an adaptive attack sees the defence (``Defense.adaptive_via``; None: undefended)."""

    @property
    def base_name(self) -> str:
        """The undefended model's name."""
        return model_name(self.arch, self.precision)

    @property
    def name(self) -> str:
        return defended_name(self.base_name, self.defense)

    def predict_labels(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict(images).argmax(dim=1)


@dataclass
class StudyContext:
    """Everything a stage of a run needs, prepared once: config, data, cache, models, targets."""

    config: StudyConfig
    out: Path
    device: torch.device
    dataset: Dataset
    cache: ArtifactCache
    progress: bool = True
    replicate: int = 0
    """Which trained replicate this context's models are (every model of it is the same one)."""
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
        return self.models[model_name(arch, FP32)]

    def siblings(self, arch: str) -> tuple[PreparedModel, ...]:
        """Every PyTorch precision of one architecture (the multibit attack's sources);
        controls are not precisions."""
        return tuple(m for m in self.models.values() if m.arch == arch and not m.tag)

    def data_identity(self) -> dict[str, Any]:
        """What identifies the training data in cache keys."""
        return {
            "dataset": self.dataset.name,
            "limit": self.config.limit,
            "seed": self.config.data_seed,
            "shape": list(self.dataset.train.images.shape[1:]),
            "n_train": len(self.dataset.train),
        }

    def for_replicate(self, replicate: int) -> StudyContext:
        """The same study, data and cache, with no model yet: replicate ``replicate``'s."""
        return StudyContext(self.config, self.out, self.device, self.dataset, self.cache,
                            progress=self.progress, replicate=replicate)  # fmt: skip

    def log(self, message: str) -> None:
        """One time-stamped line of the stage log (above any progress bar, which vanishes when
        done), so a run can be followed and scrolled back through; silent with ``--quiet``."""
        if self.progress:
            stamp = time.strftime("%H:%M:%S")
            where = f"replicate {self.replicate}: " if self.config.replicates > 1 else ""
            tqdm.write(f"[{stamp}] {where}{message}", file=sys.stderr)

    def model_record(self, name: str) -> ModelRecord:
        return next(r for r in self.model_records if r.name == name)
