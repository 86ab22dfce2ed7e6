"""Training (SGD + cosine, deterministic shuffling), batched prediction and accuracy."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from quantpatch._runtime import resolve_device
from quantpatch.data._types import Split
from quantpatch.errors import QuantpatchError, ShapeError
from quantpatch.metrics import Rate, accuracy
from quantpatch.models.determinism import TRAINING_THREADS, deterministic_training


class TrainConfig(BaseModel):
    """Everything that determines a training run (hashable, so it can key a cache)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    epochs: int = Field(10, ge=0, description="passes over the training split (0: no training)")
    lr: float = Field(
        0.05, gt=0, description="initial SGD learning rate, cosine-annealed per step to 0"
    )
    batch_size: int = Field(128, ge=1, description="images per SGD step")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum, in [0, 1)")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay (L2 penalty)")
    seed: int = Field(
        0,
        description="seeds the shuffle order and training's random draws (in a study also "
        "the fp32 model's initial weights)",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="cross-entropy label smoothing, in [0, 1)"
    )


ParamGroups = Iterable[torch.Tensor] | Iterable[dict[str, Any]]
Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
InputTransform = Callable[[torch.Tensor], torch.Tensor]


def train_model(
    model: nn.Module,
    split: Split,
    config: TrainConfig,
    device: torch.device | str,
    progress: bool = True,
    desc: str = "train",
    param_groups: ParamGroups | None = None,
    objective: Objective | None = None,
    threads: int | None = TRAINING_THREADS,
    input_transform: InputTransform | None = None,
) -> nn.Module:
    """Train ``model`` in place on ``split`` and return it in eval mode.

    SGD with momentum, cosine-annealed per step from ``config.lr`` to 0 over all steps; the
    shuffle order comes from a generator seeded with ``config.seed`` (no augmentation), and
    training runs inside ``deterministic_training(config.seed, threads)``: on a CPU, pinned to
    ``threads`` intra-op threads (None: the process's), so the weights do not depend on the
    caller's thread settings (they still depend on the CPU's kernels). All trainable
    parameters are optimised, including extra ones such as learned quantizer scales; pass
    ``param_groups`` (torch optimizer style) to give some of them their own lr or weight
    decay. ``objective(images, labels)`` replaces the cross-entropy of ``model`` (the training
    defences: several precisions, patches). ``input_transform`` maps each batch of images to
    the model's input before the loss (certifiable training: ablated or masked images; it
    owns its seeded random draws).
    """
    device = resolve_device(device)
    n = len(split)
    if n < 2:
        raise ShapeError(f"training needs at least 2 images, got {n}")
    with deterministic_training(config.seed, threads, device):
        _train(model, split, config, device, progress, desc, param_groups, objective,
               input_transform)  # fmt: skip
    return model.eval()


def _train(
    model: nn.Module,
    split: Split,
    config: TrainConfig,
    device: torch.device,
    progress: bool,
    desc: str,
    param_groups: ParamGroups | None,
    objective: Objective | None,
    input_transform: InputTransform | None,
) -> None:
    n = len(split)
    model.to(device).train()
    params = (
        list(param_groups)
        if param_groups is not None
        else [p for p in model.parameters() if p.requires_grad]
    )
    optimizer = torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    batches = _batch_bounds(n, config.batch_size)
    total = max(config.epochs * len(batches), 1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    generator = torch.Generator().manual_seed(config.seed)
    bar = tqdm(total=config.epochs * len(batches), desc=desc, disable=not progress, leave=False)
    try:
        for _ in range(config.epochs):
            order = torch.randperm(n, generator=generator).to(split.images.device)
            for start, stop in batches:
                idx = order[start:stop]
                images = split.images[idx].to(device, non_blocking=True)
                labels = split.labels[idx].to(device, non_blocking=True)
                if input_transform is not None:
                    with torch.no_grad():
                        images = input_transform(images)
                if objective is None:
                    loss = loss_fn(model(images), labels)
                else:
                    loss = objective(images, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise QuantpatchError(f"{desc}: loss became {value}; lower the learning rate")
                bar.set_postfix(loss=f"{value:.3f}", refresh=False)
                bar.update(1)
    finally:
        bar.close()


def _batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Batch slices over one epoch; a trailing batch of one image is dropped (BatchNorm)."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds.pop()
    return bounds


def predict_logits(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    device: torch.device | str,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Float32 CPU logits for ``images`` (N, C, H, W), batched, in eval and inference mode.

    ``model`` may be any callable; an ``nn.Module`` is moved to ``device``, put in eval mode
    for the call and returned to its previous mode afterwards.
    """
    if images.ndim != 4:
        raise ShapeError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = resolve_device(device)
    is_module = isinstance(model, nn.Module)
    was_training = is_module and model.training
    if is_module:
        model.to(device).eval()
    try:
        with torch.inference_mode():
            chunks = [
                model(images[s : s + batch_size].to(device)).float().cpu()
                for s in range(0, max(len(images), 1), batch_size)
            ]
    finally:
        if is_module:
            model.train(was_training)
    return torch.cat(chunks)  # outside inference mode: a normal tensor callers may reuse


def evaluate_accuracy(
    model: Callable[[torch.Tensor], torch.Tensor],
    split: Split,
    device: torch.device | str,
    batch_size: int = 1024,
) -> Rate:
    """Top-1 accuracy of ``model`` on ``split`` with its Wilson interval."""
    logits = predict_logits(model, split.images, device, batch_size)
    return accuracy(logits.argmax(dim=1), split.labels.cpu())
