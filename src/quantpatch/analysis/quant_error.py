"""Quantization-strength lens: how far does each layer's output move when the model is quantized?"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from quantpatch.analysis._common import (
    batches,
    capture_outputs,
    check_images,
    evaluating,
    fired,
    resolve_layers,
)
from quantpatch.errors import ShapeError


def layer_quant_error(
    fp_model: nn.Module,
    q_model: nn.Module,
    images: torch.Tensor,
    device: torch.device,
    layers: Sequence[str] | None = None,
    batch_size: int = 256,
) -> list[tuple[str, float]]:
    """Relative L2 error ||q - f|| / ||f|| of each same-named layer's output, over all images.

    Both models see the same images; the norms are pooled over the whole set (not averaged per
    image), so near-zero outputs of single images cannot blow the ratio up. Errors accumulate:
    a layer's error includes what earlier quantized layers passed on. NaN if ||f|| = 0.
    """
    check_images(images)
    names, explicit = resolve_layers([fp_model, q_model], layers)
    fp_model.to(device)
    q_model.to(device)
    diff_sq: dict[str, float] = {}
    ref_sq: dict[str, float] = {}
    with (
        evaluating(fp_model, q_model),
        torch.inference_mode(),
        capture_outputs(fp_model, names) as fp_store,
        capture_outputs(q_model, names) as q_store,
    ):
        for part in batches(len(images), batch_size):
            fp_store.clear()
            q_store.clear()
            x = images[part].to(device)
            fp_model(x)
            q_model(x)
            names = fired(q_store, fired(fp_store, names, explicit), explicit)
            for name in names:
                ref, out = fp_store[name].float(), q_store[name].float()
                if ref.shape != out.shape:
                    raise ShapeError(
                        f"layer '{name}' outputs differ: {tuple(ref.shape)} vs {tuple(out.shape)}"
                    )
                diff_sq[name] = diff_sq.get(name, 0.0) + float(((out - ref) ** 2).sum())
                ref_sq[name] = ref_sq.get(name, 0.0) + float((ref**2).sum())
    return [
        (name, (diff_sq[name] / ref_sq[name]) ** 0.5 if ref_sq[name] > 0 else float("nan"))
        for name in names
    ]
