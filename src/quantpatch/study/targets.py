"""Targets: every model a patch is evaluated on (PyTorch models and ONNX Runtime int8)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from quantpatch._io import read_json, write_json_atomic
from quantpatch.data import Split
from quantpatch.errors import CorruptFileError
from quantpatch.metrics import accuracy
from quantpatch.models import predict_logits
from quantpatch.quant import QuantSpec
from quantpatch.results import DeploymentRecord, ModelRecord, RateRecord
from quantpatch.study.config import ORT_INT8
from quantpatch.study.core import PreparedModel, StudyContext, Target

CALIBRATION_IMAGES = 512
"""Training images ONNX Runtime calibrates its int8 activation ranges on."""

ORT_SPEC = QuantSpec(8, 8, method="ptq")
"""What ORT int8 computes: 8-bit weights and activations, quantized after training."""


def torch_target(prepared: PreparedModel, device: torch.device) -> Target:
    def predict(images: torch.Tensor) -> torch.Tensor:
        return predict_logits(prepared.module, images, device)

    return Target(
        prepared.arch, prepared.precision, prepared.spec, "torch", predict, prepared.key, prepared
    )


def prepare_targets(context: StudyContext) -> None:
    """Wrap every model as a target with its clean predictions; add ORT int8 targets."""
    for prepared in context.models.values():
        add_target(context, torch_target(prepared, context.device))
    if not context.config.ort_int8:
        return
    for arch in context.config.models:
        target, fp32_ort = ort_int8_target(context, context.fp32(arch))
        deployment = deployment_check(context, arch, target, fp32_ort)
        add_target(context, target, deployment)


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
        )
    )


def _levels(spec: QuantSpec) -> int | None:
    if spec.weights is None:
        return None
    grid = spec.weights.make_grid()
    return grid.qmax - grid.qmin + 1


def ort_int8_target(context: StudyContext, base: PreparedModel) -> tuple[Target, Any]:
    """Export ``base`` to ONNX, quantize it to int8 with ORT static QDQ, and wrap it.

    Returns the target and the fp32 ``OrtModel`` (the deployment check's speed reference)."""
    from quantpatch.quant.onnx import OrtModel, export_onnx, int8_saturates, quantize_onnx_int8

    calib = context.calibration_images(CALIBRATION_IMAGES)
    reduce_range = int8_saturates()  # part of the key: the int8 file depends on the CPU kind
    parts = {"base": base.key, "n_calib": int(calib.shape[0])}
    fp32_parts = {**parts, "precision": "fp32"}
    int8_parts = {**parts, "precision": "int8", "reduce_range": reduce_range}
    fp32 = context.cache.get(
        "onnx", fp32_parts, "onnx",
        build=lambda path: export_onnx(copy.deepcopy(base.module).cpu(), path, calib[:2]),
        load=OrtModel,
    )  # fmt: skip
    int8 = context.cache.get(
        "onnx", int8_parts, "onnx",
        build=lambda path: quantize_onnx_int8(fp32.path, path, calib, reduce_range=reduce_range),
        load=OrtModel,
    )  # fmt: skip
    key = context.cache.path("onnx", int8_parts, "onnx").stem
    return Target(base.arch, ORT_INT8, ORT_SPEC, "onnxruntime", int8, key), fp32


def deployment_check(
    context: StudyContext, arch: str, target: Target, fp32_ort: Any
) -> DeploymentRecord:
    """ORT int8 against the simulated w8a8 model and against ORT fp32 (speed), via
    ``quant.onnx.compare_int8``; cached, because timing is the slow part of a rerun."""
    reference = context.models.get(f"{arch}/w8a8")
    parts = {"int8": target.key, "reference": reference.key if reference else None,
             "n": len(context.eval_labels)}  # fmt: skip

    def build(path: Path) -> None:
        write_json_atomic(path, _check(context, arch, target, fp32_ort, reference).model_dump(
            mode="json"))  # fmt: skip

    def load(path: Path) -> DeploymentRecord:
        try:
            return DeploymentRecord.model_validate(read_json(path))
        except ValidationError as exc:
            raise CorruptFileError(f"{path}: {exc.errors()[0]['msg']}") from None

    return context.cache.get("deployment", parts, "json", build=build, load=load)


def _check(
    context: StudyContext, arch: str, target: Target, fp32_ort: Any, reference
) -> DeploymentRecord:
    from quantpatch.quant.onnx import compare_int8, int8_saturates

    check = compare_int8(
        target.predict,
        reference.module if reference else None,
        Split(context.eval_images, context.eval_labels),
        context.device,
        fp32=fp32_ort,
    )
    return DeploymentRecord(
        reference=reference.name if reference else None,
        agreement=RateRecord.of(check["agreement"]) if reference else None,
        reference_accuracy=RateRecord.of(check["sim_accuracy"]) if reference else None,
        reduce_range=int8_saturates(),
        int8_img_per_s=check["int8_img_per_s"],
        fp32_img_per_s=check["fp32_img_per_s"],
        speedup_vs_fp32=check["speedup_vs_fp32"],
    )
