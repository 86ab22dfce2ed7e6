"""Targets: every model a patch is evaluated on (PyTorch models and ONNX Runtime int8)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quantpatch._io import content_key
from quantpatch._runtime import restart_draws
from quantpatch.errors import ShapeError
from quantpatch.metrics import accuracy
from quantpatch.models import predict_logits
from quantpatch.quant import FP32, QuantSpec
from quantpatch.results import (
    DeploymentRecord,
    InputCheckRecord,
    MatchRecord,
    ModelRecord,
    RateRecord,
)
from quantpatch.study.cache import file_sha256
from quantpatch.study.config import ORT_INT8, ORT_QAT, QAT_DEPLOYED, OnnxModelSettings
from quantpatch.study.core import PreparedModel, StudyContext, Target

USER_ONNX = "onnx"
"""The precision label of a user's ONNX file in results ('<name>/onnx')."""

CALIBRATION_IMAGES = 512
"""Training images ONNX Runtime calibrates its int8 activation ranges on."""

ADVERSARIAL_PROBE: dict[str, Any] = {"name": "pgd-linf", "eps": 0.1, "steps": 10, "seed": 0}
"""Adversarial images for the deployment check: near the decision boundary, where a
simulation that merely matches on clean images would be caught out."""


def torch_target(prepared: PreparedModel, device: torch.device) -> Target:
    def predict(images: torch.Tensor) -> torch.Tensor:
        restart_draws(prepared.module)  # a random-precision model: the same draw for image k
        return predict_logits(prepared.module, images, device)  # of every call, run after run

    return Target(
        prepared.arch, prepared.precision, prepared.spec, "torch", predict, prepared.key, prepared
    )


def prepare_targets(context: StudyContext) -> None:
    """Wrap every model as a target with its clean predictions; add the ONNX Runtime targets:
    ORT static int8 of each fp32 model, and each QAT w8a8 model deployed as trained."""
    for prepared in context.models.values():
        add_target(context, torch_target(prepared, context.device))
    for settings in context.config.onnx_models:
        add_target(context, user_onnx_target(context, settings))
    if not context.config.ort_int8:
        return
    for arch in context.config.models:
        fp32 = context.fp32(arch)
        probe = Probe(context, fp32)
        target, fp32_ort = ort_int8_target(context, fp32)
        add_target(context, target, ptq_deployment(context, probe, target, fp32_ort))
        qat = context.models.get(f"{arch}/{QAT_DEPLOYED.name}")
        if qat is not None:
            target = qdq_target(context, qat)
            add_target(context, target, qdq_deployment(context, probe, qat, target, fp32_ort))


def user_onnx_target(context: StudyContext, settings: OnnxModelSettings) -> Target:
    """A user's ONNX file as a target: the [0, 1] images normalised as the file expects."""
    from quantpatch.quant.onnx import OrtModel

    session = OrtModel(settings.path)
    mean, std = _normalisation(settings, context.dataset.in_channels)

    def predict(images: torch.Tensor) -> torch.Tensor:
        return session((images.cpu() - mean) / std)  # ORT runs on the CPU

    quantized = session.kernels()["int8"] > 0
    spec = QuantSpec(8, 8, method="ptq") if quantized else FP32
    # the file and everything that changes its predictions or its name in results
    identity = {"sha256": file_sha256(settings.path), "name": settings.name,
                "mean": settings.mean, "std": settings.std}  # fmt: skip
    key = "onnx-" + content_key(identity)[:16]
    return Target(settings.name, USER_ONNX, spec, "onnxruntime", predict, key)


def _normalisation(settings: OnnxModelSettings, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    if settings.mean is None or settings.std is None:
        return torch.zeros(1, channels, 1, 1), torch.ones(1, channels, 1, 1)
    for what, values in (("mean", settings.mean), ("std", settings.std)):
        if len(values) not in (1, channels):
            raise ShapeError(f"onnx model '{settings.name}': {len(values)} {what} values for "
                             f"{channels}-channel images")  # fmt: skip

    def per_channel(values: list[float]) -> torch.Tensor:
        return torch.tensor(values).reshape(1, -1, 1, 1).expand(1, channels, 1, 1)

    return per_channel(settings.mean), per_channel(settings.std)


def check_onnx_model(settings: OnnxModelSettings, images: torch.Tensor, num_classes: int) -> None:
    """Fail in seconds when a user's ONNX file cannot take the dataset's images or does not
    give one logit per class (its input and output shapes, read from the file, are named)."""
    from quantpatch.quant.onnx import OrtModel

    session = OrtModel(settings.path)
    declared = session.session.get_inputs()[0].shape
    mean, std = _normalisation(settings, images.shape[1])
    try:
        logits = session((images[:2] - mean) / std)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own pybind error types
        raise ShapeError(
            f"onnx model '{settings.name}' ({settings.path}) expects input {declared}, the "
            f"dataset has {tuple(images.shape[1:])} images: {str(exc).splitlines()[0]}"
        ) from None
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ShapeError(
            f"onnx model '{settings.name}' gives outputs of shape {tuple(logits.shape)}; the "
            f"dataset has {num_classes} classes"
        )


def add_target(
    context: StudyContext, target: Target, deployment: DeploymentRecord | None = None
) -> None:
    target.clean_pred = target.predict_labels(context.eval_images)
    context.targets.append(target)
    clean = accuracy(target.clean_pred, context.eval_labels)
    context.model_records.append(
        ModelRecord(
            name=target.name,
            arch=target.arch,
            precision=target.precision,
            runtime=target.runtime,
            weight_bits=target.spec.weight_bits,
            weight_levels=_levels(target.spec),
            act_bits=target.spec.act_bits,
            key=target.key,
            clean=RateRecord.of(clean),
            control_of=context.control_of.get(target.name, []),
            deployment=deployment,
            recipe=target.model.recipe if target.model is not None else None,
        )
    )


def _levels(spec: QuantSpec) -> int | None:
    if spec.weights is None:
        return None
    grid = spec.weights.make_grid()
    return grid.qmax - grid.qmin + 1


def ort_int8_target(context: StudyContext, base: PreparedModel) -> tuple[Target, Any]:
    """Export ``base`` to ONNX, quantize it to int8 with ORT static QDQ, and wrap it.

    Returns the target and the fp32 ``OrtModel`` (the deployment check's null and speed
    reference)."""
    from quantpatch.quant.onnx import (
        export_onnx,
        int8_saturates,
        ort_int8_spec,
        quantize_onnx_int8,
    )

    calib = context.calibration_images(CALIBRATION_IMAGES)
    reduce_range = int8_saturates()  # part of the key: the int8 file depends on the CPU kind
    parts = {"base": base.key, "n_calib": int(calib.shape[0])}
    fp32_parts = {**parts, "precision": "fp32"}
    int8_parts = {**parts, "precision": "int8", "reduce_range": reduce_range}
    fp32, _ = _session(
        context,
        fp32_parts,
        lambda path: export_onnx(copy.deepcopy(base.module).cpu(), path, calib[:2]),
    )
    int8, key = _session(context, int8_parts, lambda path: quantize_onnx_int8(
        fp32.path, path, calib, reduce_range=reduce_range))  # fmt: skip
    spec = ort_int8_spec(reduce_range)
    return Target(base.arch, ORT_INT8, spec, "onnxruntime", int8, key), fp32


def qdq_target(context: StudyContext, qat: PreparedModel) -> Target:
    """The QAT model with its own learned scales, exported as a QDQ graph and run by ORT."""
    from quantpatch.quant.onnx import export_qdq, int8_saturates

    uint8_weights = int8_saturates()
    parts = {"base": qat.key, "precision": "qdq", "uint8_weights": uint8_weights}
    example = context.eval_images[:2]
    session, key = _session(context, parts, lambda path: export_qdq(
        qat.module, path, example, uint8_weights=uint8_weights))  # fmt: skip
    return Target(qat.arch, ORT_QAT, qat.spec, "onnxruntime", session, key)


def _session(
    context: StudyContext, parts: dict[str, Any], build: Callable[[Path], Any]
) -> tuple[Any, str]:
    """A cached ONNX file (built by ``build`` on a miss) as an ORT session, and its key."""
    from quantpatch.quant.onnx import OrtModel

    session = context.cache.get("onnx", parts, "onnx", build=build, load=OrtModel)
    return session, context.cache.path("onnx", parts, "onnx").stem


class Probe:
    """The deployment checks' adversarial images for one architecture: crafted on its fp32
    model on first use only (a rerun with cached checks never crafts them)."""

    def __init__(self, context: StudyContext, fp32: PreparedModel) -> None:
        self.context, self.fp32 = context, fp32
        self._images: torch.Tensor | None = None

    @property
    def label(self) -> str:
        params = ", ".join(f"{k} {v}" for k, v in ADVERSARIAL_PROBE.items() if k != "name")
        return f"{ADVERSARIAL_PROBE['name']} on {self.fp32.name} ({params})"

    def images(self) -> torch.Tensor:
        if self._images is None:
            from quantpatch.attacks import create_attack

            attack = create_attack(**ADVERSARIAL_PROBE, progress=False)
            context = self.context
            self._images = attack.perturb(
                [self.fp32.module], context.eval_images, context.eval_labels, context.device
            )
        return self._images


def ptq_deployment(
    context: StudyContext, probe: Probe, target: Target, fp32_ort: Any
) -> DeploymentRecord:
    """ORT static int8 against its simulation by ORT's rules (same calibration images, same
    observers, same reduce_range), with fp32 as the null."""
    from quantpatch.quant.onnx import int8_saturates, simulate_ort_int8

    def simulation() -> torch.nn.Module:
        calib = context.calibration_images(CALIBRATION_IMAGES)  # the images ORT calibrated on
        return simulate_ort_int8(
            probe.fp32.module, calib, reduce_range=int8_saturates(), device=context.device
        )

    reference = f"{probe.fp32.name} quantized by ORT's rules (simulated)"
    return _deployment(context, "ptq", reference, probe, target, fp32_ort, simulation)


def qdq_deployment(
    context: StudyContext, probe: Probe, qat: PreparedModel, target: Target, fp32_ort: Any
) -> DeploymentRecord:
    """The exported QAT model against the trained fake-quant model itself."""
    return _deployment(context, "qat-qdq", qat.name, probe, target, fp32_ort, lambda: qat.module)


def _deployment(
    context: StudyContext,
    kind: str,
    reference: str,
    probe: Probe,
    target: Target,
    fp32_ort: Any,
    simulation: Callable[[], Any],
) -> DeploymentRecord:
    """Run ``quant.onnx.compare_int8`` on clean and adversarial images; cached, because the
    adversarial images and the timing are the slow part of a rerun."""
    parts = {"int8": target.key, "kind": kind, "fp32": probe.fp32.key,
             "n": len(context.eval_labels), "adversarial": ADVERSARIAL_PROBE}  # fmt: skip
    return context.cache.record("deployment", parts, DeploymentRecord, lambda: _compare(
        context, kind, reference, probe, target, fp32_ort, simulation()))  # fmt: skip


def _compare(
    context: StudyContext,
    kind: str,
    reference: str,
    probe: Probe,
    target: Target,
    fp32_ort: Any,
    simulation: Any,
) -> DeploymentRecord:
    from quantpatch.quant.onnx import compare_int8, int8_saturates

    images, labels = context.eval_images, context.eval_labels
    check = compare_int8(target.predict, simulation, fp32_ort, images, labels,
                         adversarial=probe.images(), device=context.device)  # fmt: skip
    return DeploymentRecord(
        kind=kind,
        reference=reference,
        reduce_range=int8_saturates(),
        clean=_input_record(check.clean),
        adversarial=_input_record(check.adversarial),
        adversarial_attack=probe.label,
        int8_img_per_s=check.int8_img_per_s,
        fp32_img_per_s=check.fp32_img_per_s,
        speedup_vs_fp32=check.speedup_vs_fp32,
    )


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
