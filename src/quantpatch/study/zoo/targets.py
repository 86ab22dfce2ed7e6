"""Targets: every model a patch is evaluated on. This file wraps the study's PyTorch models
and users' ONNX files; ``deployed`` adds the integer runtimes, ``defended`` the defences."""

from __future__ import annotations

import torch

from quantpatch._io import content_key
from quantpatch._runtime import restart_draws
from quantpatch.errors import ShapeError
from quantpatch.metrics import accuracy
from quantpatch.models import predict_logits
from quantpatch.quant import FP32, QuantSpec
from quantpatch.results import DeploymentRecord, ModelRecord, RateRecord
from quantpatch.study.settings.config import OnnxModelSettings
from quantpatch.study.settings.names import USER_ONNX
from quantpatch.study.store.cache import file_sha256
from quantpatch.study.zoo.context import PreparedModel, StudyContext, Target


def torch_target(prepared: PreparedModel, device: torch.device) -> Target:
    def predict(images: torch.Tensor) -> torch.Tensor:
        restart_draws(prepared.module)  # a random-precision model: the same draw for image k
        return predict_logits(prepared.module, images, device)  # of every call, run after run

    return Target(
        prepared.arch, prepared.precision, prepared.spec, "torch", predict, prepared.key, prepared
    )


def prepare_targets(context: StudyContext) -> None:
    """Wrap every model, and every user's ONNX file, as a target with its clean predictions."""
    for prepared in context.models.values():
        add_target(context, torch_target(prepared, context.device))
    for settings in context.config.onnx_models:
        add_target(context, user_onnx_target(context, settings))


def user_onnx_target(context: StudyContext, settings: OnnxModelSettings) -> Target:
    """A user's ONNX file as a target: the [0, 1] images normalised as the file expects."""
    from quantpatch.quant.onnx import OrtModel

    session = OrtModel(settings.path)
    mean, std = settings.normalisation(context.dataset.in_channels)

    def predict(images: torch.Tensor) -> torch.Tensor:
        return session((images.cpu() - mean) / std)  # ORT runs on the CPU

    predict.own_thread_pool = True  # type: ignore[attr-defined]  # ORT's own threads

    quantized = session.kernels()["int8"] > 0
    spec = QuantSpec(8, 8, method="ptq") if quantized else FP32
    # the file and everything that changes its predictions or its name in results
    identity = {"sha256": file_sha256(settings.path), "name": settings.name,
                "mean": settings.mean, "std": settings.std}  # fmt: skip
    key = "onnx-" + content_key(identity)[:16]
    return Target(settings.name, USER_ONNX, spec, "onnxruntime", predict, key)


def check_onnx_model(settings: OnnxModelSettings, images: torch.Tensor, num_classes: int) -> None:
    """Fail in seconds when a user's ONNX file cannot take the dataset's images or does not
    give one logit per class (its input and output shapes, read from the file, are named)."""
    from quantpatch.quant.onnx import OrtModel

    session = OrtModel(settings.path)
    declared = session.session.get_inputs()[0].shape
    mean, std = settings.normalisation(images.shape[1])
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
            replicate=context.replicate,
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
