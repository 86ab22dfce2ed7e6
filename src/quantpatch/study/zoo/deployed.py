"""Deployed targets: each model of the study shipped on every deployment of the study (an
integer runtime from ``quantpatch.deployments``), and the check that its simulation predicts
the runtime. Nothing here is part of a trained model's cache key: editing a runtime or this
check rebuilds deployed files and checks, never a model."""

from __future__ import annotations

from typing import Any

import torch

from quantpatch.deployments import Deployment, create_deployment
from quantpatch.results import DeploymentRecord, InputCheckRecord, MatchRecord, RateRecord
from quantpatch.study.settings.names import model_name
from quantpatch.study.zoo.context import PreparedModel, StudyContext, Target
from quantpatch.study.zoo.targets import add_target

CALIBRATION_IMAGES = 512
"""Training images a runtime calibrates its int8 activation ranges on."""

ADVERSARIAL_PROBE: dict[str, Any] = {"name": "pgd-linf", "eps": 0.1, "steps": 10, "seed": 0}
"""Adversarial images for the deployment check: near the decision boundary, where a
simulation that merely matches on clean images would be caught out."""

PATCH_PROBE: dict[str, Any] = {"name": "patch-pgd", "steps": 10, "location": "random", "seed": 0}
"""Patch images for the deployment check, at the study's first patch size, crafted on each
deployment's simulation: saturated patch pixels push activations to the ranges the runtime
clips to, which pixel perturbations of 0.1 never reach. Short (10 steps, one random place per
image), because the check needs patched inputs near the boundary, not the strongest patch."""


def prepare_deployed_targets(context: StudyContext) -> None:
    """Every deployment of every architecture: the fp32 model quantized by the runtime, or a
    QAT model shipped as trained; each a target with its check against its simulation."""
    deployments = [create_deployment(name) for name in context.config.deployed_precisions]
    for arch in context.config.models:
        fp32 = context.fp32(arch)
        probe = Probe(context, fp32)
        for deployment in deployments:
            source = fp32
            if deployment.source is not None:
                source = context.models[model_name(arch, deployment.source.name)]
            target = deployed_target(context, deployment, source)
            reference = runtime_fp32(context, deployment, fp32)
            add_target(
                context, target, check(context, deployment, probe, source, target, reference)
            )


def deployed_target(context: StudyContext, deployment: Deployment, source: PreparedModel) -> Target:
    """``source`` exported by ``deployment`` (cached) and opened as a session."""
    calib = context.calibration_images(CALIBRATION_IMAGES)
    parts = {"base": source.key, "deployment": deployment.name, "n_calib": int(calib.shape[0]),
             **deployment.fingerprint()}  # fmt: skip
    session, key = deployed_artifact(
        context, deployment, parts, lambda path: deployment.export(source.module, calib, path)
    )
    spec = deployment.spec(source.spec)
    return Target(source.arch, deployment.name, spec, deployment.runtime, session, key)


def runtime_fp32(context: StudyContext, deployment: Deployment, fp32: PreparedModel) -> Any:
    """The fp32 network in the deployment's runtime: the check's null and speed reference
    (one per runtime, shared by its deployments)."""
    example = context.calibration_images(CALIBRATION_IMAGES)[:2]
    parts = {"base": fp32.key, "runtime": deployment.runtime, "precision": "fp32"}
    session, _ = deployed_artifact(
        context, deployment, parts, lambda path: deployment.export_fp32(fp32.module, example, path)
    )
    return session


def deployed_artifact(context: StudyContext, deployment: Deployment, parts: dict, build) -> tuple:
    """A cached exported file (built on a miss), opened as a session, and its key."""
    cache = context.cache
    session = cache.get("deployments", parts, deployment.suffix, build=build, load=deployment.load)
    return session, cache.path("deployments", parts, deployment.suffix).stem


class Probe:
    """The deployment checks' adversarial images for one architecture: crafted on its fp32
    model on first use only (a rerun with cached checks never crafts them)."""

    def __init__(self, context: StudyContext, fp32: PreparedModel) -> None:
        self.context, self.fp32 = context, fp32
        self._images: torch.Tensor | None = None

    @property
    def label(self) -> str:
        return _label(ADVERSARIAL_PROBE, self.fp32.name)

    def images(self) -> torch.Tensor:
        if self._images is None:
            self._images = _crafted(self.context, ADVERSARIAL_PROBE, self.fp32.module)
        return self._images


def check(
    context: StudyContext,
    deployment: Deployment,
    probe: Probe,
    source: PreparedModel,
    target: Target,
    runtime_fp32: Any,
) -> DeploymentRecord:
    """The runtime against its simulation on clean and adversarial images, with the
    runtime's fp32 network as the null; cached, because the adversarial images and the timing
    are the slow part of a rerun."""
    parts = {"int8": target.key, "kind": deployment.kind, "fp32": probe.fp32.key,
             "n": len(context.eval_labels), "adversarial": ADVERSARIAL_PROBE,
             "patched": _patch_probe(context)}  # fmt: skip
    return context.cache.record("deployment", parts, DeploymentRecord, lambda: _compare(
        context, deployment, probe, source, target, runtime_fp32))  # fmt: skip


def _compare(
    context: StudyContext,
    deployment: Deployment,
    probe: Probe,
    source: PreparedModel,
    target: Target,
    runtime_fp32: Any,
) -> DeploymentRecord:
    from quantpatch.quant.onnx import compare_int8

    calib = context.calibration_images(CALIBRATION_IMAGES)  # the images it calibrated on
    simulation = deployment.simulation(source.module, calib, context.device)
    images, labels = context.eval_images, context.eval_labels
    patched = _crafted(context, _patch_probe(context), simulation)
    result = compare_int8(target.predict, simulation, runtime_fp32, images, labels,
                          adversarial=probe.images(), patched=patched,
                          device=context.device)  # fmt: skip
    simulated = deployment.source is None
    reference = (f"{source.name} quantized by {deployment.runtime}'s rules (simulated)"
                 if simulated else source.name)  # fmt: skip
    return DeploymentRecord(
        deployment=deployment.name,
        kind=deployment.kind,
        reference=reference,
        settings=deployment.fingerprint(),
        clean=_input_record(result.clean),
        adversarial=_input_record(result.adversarial),
        adversarial_attack=probe.label,
        patched=_input_record(result.patched),
        patched_attack=_label(_patch_probe(context), "the simulation"),
        int8_img_per_s=result.int8_img_per_s,
        fp32_img_per_s=result.fp32_img_per_s,
        speedup_vs_fp32=result.speedup_vs_fp32,
    )


def _patch_probe(context: StudyContext) -> dict[str, Any]:
    return {**PATCH_PROBE, "patch_size": context.config.patch_sizes[0]}


def _crafted(
    context: StudyContext, settings: dict[str, Any], model: torch.nn.Module
) -> torch.Tensor:
    """The evaluation images attacked by the probe ``settings`` on ``model``."""
    from quantpatch.attacks import ATTACKS

    attack = ATTACKS.create(**settings, progress=False)
    return attack.perturb([model], context.eval_images, context.eval_labels, context.device)


def _label(settings: dict[str, Any], on: str) -> str:
    params = ", ".join(f"{k} {v}" for k, v in settings.items() if k != "name")
    return f"{settings['name']} on {on} ({params})"


def _input_record(check: Any) -> InputCheckRecord:
    def match(m: Any) -> MatchRecord:
        return MatchRecord(agreement=RateRecord.of(m.top1), logit_error=m.logit_error,
                           reference_accuracy=RateRecord.of(m.reference_accuracy))  # fmt: skip

    return InputCheckRecord(
        int8_accuracy=RateRecord.of(check.int8_accuracy),
        simulation=match(check.simulation),
        fp32=match(check.fp32),
        simulation_closer=check.simulation_closer,
    )
