"""Every model a study trains: fp32, each quantized precision, the fp32 controls and the
training defences' models, each built once and kept in the artifact cache."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from quantpatch import __version__
from quantpatch.data import Split
from quantpatch.defenses.training import train_recipe
from quantpatch.models import (
    TrainConfig,
    create_model,
    evaluate_accuracy,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    train_model,
)
from quantpatch.quant import FP32, QuantSpec, build_quantized, quantize
from quantpatch.quant.switchable import SwitchablePrecision
from quantpatch.study.settings.config import RecipeSettings
from quantpatch.study.settings.names import INDEPENDENT_TAG, control_tag, random_precision
from quantpatch.study.store.cache import RECIPE_CODE, code_fingerprint, file_sha256
from quantpatch.study.zoo.context import PreparedModel, StudyContext


def prepare_models(context: StudyContext) -> None:
    """The fp32 model of every architecture, then each of its quantized precisions, its
    controls, its independent twin where an attack is crafted on it, and its training
    defences' models."""
    for arch in context.config.models:
        started = time.perf_counter()
        base = prepare_fp32(context, arch)
        context.models[base.name] = base
        for spec in context.config.precisions:
            if not spec.is_float:
                prepared = prepare_quantized(context, base, spec)
                context.models[prepared.name] = prepared
        if context.config.controls:
            _prepare_controls(context, base)
        if context.config.independent_source:
            independent = prepare_fp32(context, arch, independent=True)
            context.models[independent.name] = independent
        for settings in context.config.recipes:
            for prepared in prepare_recipe(context, base, settings):
                context.models[prepared.name] = prepared
        context.log(f"models for {arch} ready in {time.perf_counter() - started:.1f} s")


def _prepare_controls(context: StudyContext, base: PreparedModel) -> None:
    config = context.config
    for tag, schedule in control_schedules(context).items():
        control = prepare_control(context, base, schedule, tag)
        context.models[control.name] = control
        context.control_of[control.name] = [
            m.name
            for m in context.siblings(base.arch)
            if m.spec.method == "qat" and not m.spec.is_float
            and config.qat_config_for(m.spec) == schedule
        ]  # fmt: skip


REPLICATE_SEED_STEP = 1000
"""Replicate k trains every model from its settings' seed + k x this step: independent
seeds, and replicate 0 is the model a study without replicates trains."""


def replicated(context: StudyContext, schedule: TrainConfig) -> TrainConfig:
    """``schedule`` for this context's replicate (its own seed: initial weights, batches)."""
    if context.replicate == 0:
        return schedule
    seed = schedule.seed + REPLICATE_SEED_STEP * context.replicate
    return schedule.model_copy(update={"seed": seed})


def prepare_fp32(context: StudyContext, arch: str, *, independent: bool = False) -> PreparedModel:
    """Train (or load from cache) the float model of ``arch``.

    ``independent``: a second fp32 model trained the same way from another seed (tag
    'indep'), the reference level for the similarity lenses: two models that share nothing
    but the architecture and the data."""
    config, dataset = context.config, context.dataset
    train_cfg = replicated(context, config.train_config_for(arch))
    if independent:
        train_cfg = train_cfg.model_copy(update={"seed": train_cfg.seed + 1})
    parts = {"arch": arch, "data": context.data_identity(), "train": train_cfg.model_dump()}
    torch.manual_seed(train_cfg.seed)  # initial weights depend on the seed, not on run history
    model = create_model(
        arch,
        in_channels=dataset.in_channels,
        num_classes=dataset.num_classes,
        image_size=dataset.image_size,
        mean=dataset.mean,
        std=dataset.std,
    )

    weights = None if independent else config.weights.get(arch)
    if weights is not None:  # the user's own fp32 model: loaded, never trained
        parts = {"arch": arch, "data": context.data_identity(), "weights": file_sha256(weights)}

    def build(path: Path) -> None:
        if weights is not None:
            load_weights(model, weights)
        else:
            desc = f"train {arch}" + (" (independent seed)" if independent else "")
            train_model(model, dataset.train, train_cfg, context.device, context.progress, desc)
        save_model(context, path, model, arch, FP32, train_cfg.seed)

    tag = INDEPENDENT_TAG if independent else ""
    return cached_model(context, parts, build, lambda: model, arch, FP32, tag)


def prepare_quantized(
    context: StudyContext, base: PreparedModel, spec: QuantSpec, qat: TrainConfig | None = None
) -> PreparedModel:
    """Quantize ``base`` to ``spec`` (calibrate, then QAT when asked), cached by content.

    ``qat`` replaces the study's QAT settings for this spec (the quantization-strength lens
    gives weights-only, activations-only and both the same QAT)."""
    if spec.is_float:
        return base
    config = context.config
    qat = replicated(context, qat or config.qat_config_for(spec))
    parts = {
        "base": base.key,
        "spec": spec.name,  # the canonical name: every setting of the spec, grid included
        "qat": qat.model_dump() if spec.method == "qat" else None,
        "calibration": config.calibration,
        "first_last_bits": config.first_last_bits,
    }

    def build(path: Path) -> None:
        model = build_quantized(
            base.module,
            spec,
            context.dataset.train,
            qat=qat if spec.method == "qat" else None,
            calibration=config.calibration,
            first_last_bits=config.first_last_bits,
            device=context.device,
            progress=context.progress,
        )
        save_model(context, path, model, base.arch, spec, qat.seed)

    def skeleton() -> nn.Module:
        return quantize(base.module, spec, first_last_bits=config.first_last_bits)

    return cached_model(context, parts, build, skeleton, base.arch, spec)


def prepare_control(
    context: StudyContext, base: PreparedModel, schedule: TrainConfig, tag: str
) -> PreparedModel:
    """``base`` fine-tuned in float on a QAT ``schedule``: the control that gives fp32 the same
    extra training a quantized model got, so their differences are quantization's alone."""
    schedule = replicated(context, schedule)
    parts = {"base": base.key, "finetune": schedule.model_dump()}

    def build(path: Path) -> None:
        model = copy.deepcopy(base.module)
        desc = f"fine-tune {base.arch} ({tag})"
        train_model(model, context.dataset.train, schedule, context.device, context.progress, desc)
        save_model(context, path, model, base.arch, FP32, schedule.seed)

    def skeleton() -> nn.Module:
        return copy.deepcopy(base.module)

    return cached_model(context, parts, build, skeleton, base.arch, FP32, tag)


def prepare_recipe(
    context: StudyContext, base: PreparedModel, settings: RecipeSettings
) -> list[PreparedModel]:
    """``base`` trained at fp32 and every quantized precision at once by a training defence
    (cached like any model): one model per precision, tagged with the recipe's label, plus
    the random-precision model where the recipe serves one."""
    config = context.config
    recipe = settings.create()
    schedule = replicated(context, config.recipe_schedule(settings))
    specs = [FP32, *(p for p in config.precisions if not p.is_float)]
    parts = {
        "base": base.key,
        "recipe": settings.name,
        "params": recipe.params(),
        "specs": [spec.name for spec in specs],
        "qat": schedule.model_dump(),
        "calibration": config.calibration,
        "first_last_bits": config.first_last_bits,
        "recipe_code": code_fingerprint(*RECIPE_CODE),
    }

    def build(path: Path) -> None:
        model = train_recipe(
            base.module, specs, recipe, context.dataset.train, schedule,
            calibration=config.calibration, first_last_bits=config.first_last_bits,
            device=context.device, progress=context.progress,
        )  # fmt: skip
        save_model(context, path, model, base.arch, FP32, schedule.seed)

    def skeleton() -> nn.Module:
        return SwitchablePrecision.from_float(base.module, specs,
                                              first_last_bits=config.first_last_bits)  # fmt: skip

    whole = cached_model(context, parts, build, skeleton, base.arch, FP32, settings.label)
    switchable: SwitchablePrecision = whole.module  # type: ignore[assignment]

    def member(spec: QuantSpec, module: nn.Module, key: str, label: str | None = None):
        return PreparedModel(base.arch, spec, module, key, tag=settings.label,
                             recipe=settings.label, label=label)  # fmt: skip

    models = [member(s, switchable.member(s.name), f"{whole.key}-{s.name}") for s in specs]
    if recipe.random_inference:
        switchable.active = None
        models.append(member(config.lowest_precision, switchable, f"{whole.key}-random",
                             random_precision(settings.label)))  # fmt: skip
    return models


def control_schedules(context: StudyContext) -> dict[str, TrainConfig]:
    """One fine-tuning schedule per distinct QAT schedule of the study, by control tag:
    'ft' for the default QAT, 'ft-<precision>' for a precision's own override."""
    config = context.config
    schedules: dict[str, TrainConfig] = {}
    for spec in config.precisions:
        if spec.is_float or spec.method != "qat":
            continue
        schedule = config.qat_config_for(spec)
        tag = control_tag(spec, default_schedule=schedule == config.qat)
        if schedule not in schedules.values():
            schedules[tag] = schedule
    return schedules


def cached_model(
    context: StudyContext,
    parts: dict,
    build,
    skeleton,
    arch: str,
    spec: QuantSpec,
    tag: str = "",
) -> PreparedModel:
    """Build (or reuse) the checkpoint of ``parts`` and load it into ``skeleton()``."""

    def load(path: Path) -> nn.Module:
        model = skeleton()
        load_checkpoint(path, model)
        return model

    parts = {**parts, "replicate": context.replicate}  # replicates never share a cache entry
    module = context.cache.get("models", parts, "safetensors", build=build, load=load)
    key = context.cache.path("models", parts, "safetensors").stem
    return PreparedModel(arch, spec, module.to(context.device).eval(), key, tag=tag)


def save_model(
    context: StudyContext,
    path: Path,
    model: nn.Module,
    arch: str,
    spec: QuantSpec,
    seed: int,
    clean_on: Split | None | Literal["test"] = "test",
) -> None:
    """The checkpoint with its metadata; its clean accuracy on ``clean_on`` (default: the
    test split; None: a model whose input is not an image, which records none)."""
    split = context.dataset.test if clean_on == "test" else clean_on
    clean = None if split is None else evaluate_accuracy(model, split, context.device).to_dict()
    metadata = {
        "arch": arch,
        "dataset": context.dataset.name,
        "precision": spec.name,
        "clean_accuracy": clean,
        "seed": seed,
        "replicate": context.replicate,
        "quantpatch_version": __version__,
        "torch_version": torch.__version__,
    }
    save_checkpoint(path, model, metadata)
