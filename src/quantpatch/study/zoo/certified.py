"""Certifiable base models: each architecture trained for one certified defence, on the inputs
that defence will show it (``Certifier.train_transform``: ablated images for derandomized
smoothing, masked ones for PatchCleanser), at fp32, at every quantized precision (QAT and
calibration on the same inputs) and on every deployment of the fp32 model.

A certificate is only as good as the base classifier on those inputs, which a model trained
on whole images rarely is; these models let a study put the same defence in front of plain
and of certifiably trained models. They are tagged 'cert' ('lenet/w8a8-cert') and are never
attack sources or undefended targets: a smoothed base model takes the 2C-channel encoding."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from quantpatch.defenses.certifiable import certifiable_transform, create_ablation_model
from quantpatch.deployments import create_deployment
from quantpatch.models import TrainConfig, create_model, train_model
from quantpatch.quant import FP32, QuantSpec, build_quantized, quantize
from quantpatch.study.settings.config import DefenseSettings
from quantpatch.study.settings.names import CERTIFIABLE_TAG, tagged
from quantpatch.study.store.cache import code_fingerprint
from quantpatch.study.zoo.context import PreparedModel, StudyContext, Target
from quantpatch.study.zoo.deployed import CALIBRATION_IMAGES, deployed_artifact
from quantpatch.study.zoo.models import cached_model, replicated, save_model
from quantpatch.study.zoo.targets import torch_target


def takes_encoded_input(defense: object) -> bool:
    """Whether the defence feeds its base model an encoding (2C channels), not images."""
    return hasattr(defense, "base_in_channels")


def certifiable_targets(
    context: StudyContext, settings: DefenseSettings, defense: object
) -> list[Target]:
    """Every architecture's certifiably trained models as (undefended) base targets for
    ``defense``: fp32, each quantized precision, then each deployment of the fp32 model."""
    targets = []
    for arch in context.config.models:
        fp32 = certifiable_fp32(context, arch, settings, defense)
        models = [fp32] + [
            certifiable_quantized(context, fp32, spec, settings, defense)
            for spec in context.config.precisions
            if not spec.is_float
        ]
        targets += [torch_target(m, context.device) for m in models]
        targets += [
            certifiable_deployed(context, fp32, name, settings, defense)
            for name in context.config.deployed_precisions
            if create_deployment(name).source is None  # the runtime quantizes fp32 itself
        ]
    return targets


CERTIFIABLE_CODE = ("defenses", "study/zoo/certified.py")
"""What a certifiable model depends on beyond ``MODEL_CODE``: its defence's training inputs."""


def _identity(settings: DefenseSettings) -> dict:
    """What the training inputs depend on: the defence, its parameters and their code (part
    of these models' keys only, so plain models survive edits there)."""
    return {"defense": settings.name, "params": settings.params,
            "code": code_fingerprint(*CERTIFIABLE_CODE)}  # fmt: skip


def certifiable_fp32(
    context: StudyContext, arch: str, settings: DefenseSettings, defense: object
) -> PreparedModel:
    """``arch`` trained from scratch on the defence's inputs (cached per replicate)."""
    config, dataset = context.config, context.dataset
    schedule = replicated(context, settings.train or config.train_config_for(arch))
    parts = {"arch": arch, "data": context.data_identity(), "train": schedule.model_dump(),
             "certifiable": _identity(settings)}  # fmt: skip
    create = create_ablation_model if takes_encoded_input(defense) else create_model
    torch.manual_seed(schedule.seed)
    model = create(arch, in_channels=dataset.in_channels, num_classes=dataset.num_classes,
                   image_size=dataset.image_size, mean=dataset.mean, std=dataset.std)  # fmt: skip

    def build(path: Path) -> None:
        transform = certifiable_transform(defense, schedule.seed)
        train_model(model, dataset.train, schedule, context.device, context.progress,
                    f"train {arch} for {settings.label}", input_transform=transform)  # fmt: skip
        save_model(context, path, model, arch, FP32, schedule.seed, _clean_split(context, defense))

    return cached_model(context, parts, build, lambda: model, arch, FP32, CERTIFIABLE_TAG)


def certifiable_quantized(
    context: StudyContext,
    fp32: PreparedModel,
    spec: QuantSpec,
    settings: DefenseSettings,
    defense: object,
) -> PreparedModel:
    """``fp32`` quantized to ``spec``: calibrated, and QAT-trained where the spec asks, on the
    defence's inputs, with the study's QAT schedule for ``spec``."""
    config = context.config
    qat: TrainConfig = replicated(context, config.qat_config_for(spec))
    parts = {"base": fp32.key, "spec": spec.name,
             "qat": qat.model_dump() if spec.method == "qat" else None,
             "calibration": config.calibration, "first_last_bits": config.first_last_bits}  # fmt: skip

    def build(path: Path) -> None:
        model = build_quantized(
            fp32.module, spec, context.dataset.train,
            qat=qat if spec.method == "qat" else None, calibration=config.calibration,
            first_last_bits=config.first_last_bits, device=context.device,
            progress=context.progress, input_transform=certifiable_transform(defense, qat.seed),
        )  # fmt: skip
        save_model(context, path, model, fp32.arch, spec, qat.seed, _clean_split(context, defense))

    def skeleton() -> nn.Module:
        return quantize(fp32.module, spec, first_last_bits=config.first_last_bits)

    return cached_model(context, parts, build, skeleton, fp32.arch, spec, CERTIFIABLE_TAG)


def certifiable_deployed(
    context: StudyContext, fp32: PreparedModel, name: str, settings: DefenseSettings,
    defense: object,
) -> Target:  # fmt: skip
    """The certifiable fp32 model on deployment ``name``, calibrated on the defence's inputs
    of the study's calibration images (one seeded draw)."""
    deployment = create_deployment(name)
    with torch.no_grad():
        calib = certifiable_transform(defense, 0)(context.calibration_images(CALIBRATION_IMAGES))
    parts = {"base": fp32.key, "deployment": deployment.name, "n_calib": int(calib.shape[0]),
             "certifiable": _identity(settings), **deployment.fingerprint()}  # fmt: skip
    session, key = deployed_artifact(
        context, deployment, parts, lambda path: deployment.export(fp32.module, calib, path)
    )
    precision = tagged(deployment.name, CERTIFIABLE_TAG)
    return Target(fp32.arch, precision, deployment.spec(FP32), deployment.runtime, session, key)


def _clean_split(context: StudyContext, defense: object):
    """What a certifiable model's checkpoint reports as its clean accuracy: none where its
    input is an encoding the test images are not in (the study certifies it instead)."""
    return None if takes_encoded_input(defense) else context.dataset.test
