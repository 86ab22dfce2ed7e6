"""Feature lens: how similar are two models' representations, and where does a patch act?

``layerwise_cka`` compares layers of e.g. an fp32 model and its quantized copy (linear CKA,
Kornblith et al. 2019); ``patch_dominance`` and Grad-CAM patch mass measure how strongly the
activation change, and the model's evidence, concentrate on the patch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from quantpatch.analysis._common import (
    batches,
    capture_outputs,
    check_images,
    evaluating,
    fired,
    last_conv_layer,
    resolve_layers,
)
from quantpatch.errors import ShapeError

_GIB = 1 << 30


def _u_centred(gram: torch.Tensor) -> torch.Tensor:
    """The U-centred Gram matrix (Song et al. 2012): its inner products are unbiased HSIC
    estimates. Invariant to adding per-row and per-column constants, so an already centred
    Gram gives the same result."""
    n = gram.shape[0]
    gram = gram.clone()
    gram.fill_diagonal_(0)
    means = gram.sum(dim=0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    gram = gram - means[:, None] - means[None, :]
    return gram.fill_diagonal_(0)


def _cka_from_grams(gram_x: torch.Tensor, gram_y: torch.Tensor, debiased: bool = False) -> float:
    """Linear CKA from Gram matrices of column-centred features: <K, L> / (|K| |L|);
    ``debiased`` uses U-centred Grams (Nguyen et al. 2021: plain CKA is biased upwards when N
    is small next to the feature width, as for conv layers on a few hundred images)."""
    gram_x, gram_y = gram_x.double(), gram_y.double()
    if debiased:
        if gram_x.shape[0] < 4:
            raise ShapeError("debiased CKA needs at least 4 samples")
        gram_x, gram_y = _u_centred(gram_x), _u_centred(gram_y)
    denom = torch.linalg.norm(gram_x) * torch.linalg.norm(gram_y)
    if denom <= 0:
        return float("nan")  # a constant representation has no similarity structure
    return float((gram_x * gram_y).sum() / denom)


def linear_cka(x: torch.Tensor, y: torch.Tensor, *, debiased: bool = False) -> float:
    """Linear CKA between features x (N, Dx) and y (N, Dy) of the same N inputs, in [0, 1]
    (debiased: an unbiased estimate, which can dip slightly below 0 for unrelated features).

    Columns are centred; uses the feature-space form |Y'X|^2 / (|X'X| |Y'Y|) when both widths
    are at most N, else the equivalent N x N Gram form. NaN if either side is constant.
    Invariant to orthogonal transforms and isotropic scaling of either side.
    """
    if x.shape[0] != y.shape[0]:
        raise ShapeError(f"linear_cka needs the same N, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < 2:
        raise ShapeError("linear_cka needs at least 2 samples")
    x = x.flatten(1).double()
    y = y.flatten(1).double()
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    n = x.shape[0]
    if debiased:
        return _cka_from_grams(x @ x.T, y @ y.T, debiased=True)
    if x.shape[1] <= n and y.shape[1] <= n:
        denom = torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y)
        if denom <= 0:
            return float("nan")
        return float(torch.linalg.norm(y.T @ x) ** 2 / denom)
    return _cka_from_grams(x @ x.T, y @ y.T)


def _collect(
    model: nn.Module,
    images: torch.Tensor,
    names: Sequence[str],
    device: torch.device,
    batch_size: int,
    explicit: bool,
    out_device: torch.device,
) -> dict[str, torch.Tensor]:
    """Flattened (N, D) outputs of the named layers, filled batch by batch into one tensor."""
    check_images(images)
    model.to(device)
    out: dict[str, torch.Tensor] = {}
    with evaluating(model), torch.inference_mode(), capture_outputs(model, names) as store:
        for part in batches(len(images), batch_size):
            store.clear()
            model(images[part].to(device))
            names = fired(store, names, explicit)
            for name in names:
                act = store[name].flatten(1).float()
                if name not in out:
                    out[name] = torch.empty(len(images), act.shape[1], device=out_device)
                out[name][part] = act.to(out_device)
    return {name: out[name] for name in names}


def collect_activations(
    model: nn.Module,
    images: torch.Tensor,
    layer_names: Sequence[str],
    device: torch.device,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Output of each named layer for every image, flattened per sample: name -> (N, D), CPU."""
    names, _ = resolve_layers([model], layer_names)
    return _collect(model, images, names, device, batch_size, True, torch.device("cpu"))


def _feature_sizes(model: nn.Module, images: torch.Tensor, names: list[str], device) -> dict:
    with evaluating(model), torch.inference_mode(), capture_outputs(model, names) as store:
        model.to(device)(images[:1].to(device))
        return {name: store[name][0].numel() for name in names if name in store}


def _layer_grams(
    model: nn.Module,
    images: torch.Tensor,
    names: list[str],
    device: torch.device,
    batch_size: int,
    explicit: bool,
    max_bytes: int,
) -> dict[str, torch.Tensor]:
    """Centred N x N Gram matrix per layer. Layers are processed in groups whose activations
    fit in ``max_bytes`` (one forward pass per group), so deep nets never hold all at once."""
    sizes = _feature_sizes(model, images, names, device)
    names = fired(sizes, names, explicit)
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        need = 4 * len(images) * sizes[name]
        if groups[-1] and used + need > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += need
    grams: dict[str, torch.Tensor] = {}
    for group in groups:
        acts = _collect(model, images, group, device, batch_size, explicit, device)
        for name, act in acts.items():
            act = act - act.mean(dim=0)
            grams[name] = (act @ act.T).double().cpu()
        del acts
    return grams


def layerwise_cka(
    model_a: nn.Module,
    model_b: nn.Module,
    images: torch.Tensor,
    device: torch.device,
    layers: Sequence[str] | None = None,
    batch_size: int = 256,
    max_bytes: int = _GIB,
    *,
    debiased: bool = False,
) -> list[tuple[str, float]]:
    """Linear CKA (or debiased CKA) between the same-named layers of two models on the same
    images.

    Default layers: model_a's Conv2d/Linear layers that model_b also has (quantize() keeps the
    names). Memory is O(N^2) per layer plus at most ``max_bytes`` of activations at a time.
    """
    names, explicit = resolve_layers([model_a, model_b], layers)
    grams_a = _layer_grams(model_a, images, names, device, batch_size, explicit, max_bytes)
    grams_b = _layer_grams(model_b, images, names, device, batch_size, explicit, max_bytes)
    return [
        (name, _cka_from_grams(grams_a[name], grams_b[name], debiased))
        for name in names
        if name in grams_a and name in grams_b
    ]


def _check_mask(mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    batch, _, height, width = images.shape
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2:] != (height, width):
        raise ShapeError(f"mask must be (B, 1, {height}, {width}), got {tuple(mask.shape)}")
    if mask.shape[0] not in (1, batch):
        raise ShapeError(f"mask batch {mask.shape[0]} does not match images batch {batch}")
    return mask.float().expand(batch, 1, height, width)


def patch_dominance(
    model: nn.Module,
    clean: torch.Tensor,
    patched: torch.Tensor,
    patch_mask_img: torch.Tensor,
    device: torch.device,
    layers: Sequence[str] | None = None,
    batch_size: int = 256,
) -> list[tuple[str, float]]:
    """How much a layer's activation change concentrates at the patch, per spatial layer.

    For each layer with a (C, h, w) output: the share of |patched - clean| (summed over channels
    and over all images) that falls inside the patch region, divided by that region's share of
    the map. The region is the image mask adaptive-max-pooled to (h, w): every map cell whose
    input window overlaps the patch. 1 = no localisation, > 1 = change concentrated at the patch
    (a map fully covered by the region is exactly 1). NaN if the patch changes nothing.
    Layers without a spatial output (e.g. Linear) are skipped.
    """
    if clean.shape != patched.shape:
        raise ShapeError(f"clean {tuple(clean.shape)} and patched {tuple(patched.shape)} differ")
    check_images(clean)
    mask = _check_mask(patch_mask_img, clean)
    names, explicit = resolve_layers([model], layers)
    model.to(device)
    inside: dict[str, float] = {}
    total: dict[str, float] = {}
    area: dict[str, float] = {}
    cells: dict[str, int] = {}
    with evaluating(model), torch.inference_mode(), capture_outputs(model, names) as store:
        for part in batches(len(clean), batch_size):
            store.clear()
            model(torch.cat([clean[part], patched[part]]).to(device))
            names = fired(store, names, explicit)
            for name in names:
                act = store[name]
                if act.ndim != 4:
                    continue
                act_clean, act_patched = act.float().chunk(2)
                change = (act_patched - act_clean).abs().sum(dim=1)  # (b, h, w)
                region = F.adaptive_max_pool2d(mask[part].to(device), act.shape[2:])[:, 0]
                inside[name] = inside.get(name, 0.0) + float((change * region).sum())
                total[name] = total.get(name, 0.0) + float(change.sum())
                area[name] = area.get(name, 0.0) + float(region.sum())
                cells[name] = cells.get(name, 0) + region.numel()
    result = []
    for name in names:
        if name not in total:
            continue
        change_share = inside[name] / total[name] if total[name] > 0 else float("nan")
        area_share = area[name] / cells[name]
        result.append((name, change_share / area_share if area_share > 0 else float("nan")))
    return result


def _class_tensor(class_idx: int | torch.Tensor, batch: int) -> torch.Tensor:
    if isinstance(class_idx, int):
        return torch.full((batch,), class_idx, dtype=torch.long)
    class_idx = torch.as_tensor(class_idx, dtype=torch.long).flatten()
    if class_idx.numel() == 1:
        return class_idx.expand(batch)
    if class_idx.shape != (batch,):
        raise ShapeError(f"class_idx must be an int or ({batch},), got {tuple(class_idx.shape)}")
    return class_idx


def gradcam(
    model: nn.Module,
    images: torch.Tensor,
    class_idx: int | torch.Tensor,
    layer: str | None,
    device: torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) for ``class_idx`` (int or (B,)) at a conv layer.

    Channel weights = spatial mean of d logit / d activation; CAM = ReLU(sum_c w_c A_c),
    bilinearly upsampled to the image size and normalised to sum 1 per image: (B, H, W), CPU.
    An all-zero CAM (no positive evidence) becomes uniform. ``layer=None``: last conv layer.
    """
    check_images(images)
    layer = layer or last_conv_layer(model)
    names, _ = resolve_layers([model], [layer])
    classes = _class_tensor(class_idx, len(images))
    height, width = images.shape[2:]
    model.to(device)
    with (
        evaluating(model),
        torch.inference_mode(False),
        torch.enable_grad(),
        capture_outputs(model, names, clone=False) as store,
    ):
        out = torch.empty(len(images), height, width, dtype=images.dtype)
        for part in batches(len(images), batch_size):
            x = images[part].to(device).clone().requires_grad_(True)
            logits = model(x)
            fired(store, names, True)
            act = store[layer]
            if act.ndim != 4:
                raise ShapeError(f"Grad-CAM layer '{layer}' must have a (C, h, w) output")
            score = logits.gather(1, classes[part].to(device)[:, None]).sum()
            (grad,) = torch.autograd.grad(score, act)
            weights = grad.mean(dim=(2, 3), keepdim=True)
            cam = F.relu((weights * act).sum(dim=1, keepdim=True)).detach()
            cam = F.interpolate(cam, size=(height, width), mode="bilinear", align_corners=False)
            out[part] = cam[:, 0].clamp_min(0).cpu()
    out = out.float()
    mass = out.sum(dim=(1, 2), keepdim=True)
    uniform = torch.full_like(out, 1.0 / (height * width))
    return torch.where(mass > 0, out / mass.clamp_min(1e-30), uniform)


def gradcam_patch_mass(
    model: nn.Module,
    images: torch.Tensor,
    mask: torch.Tensor,
    class_idx: int | torch.Tensor,
    layer: str | None,
    device: torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    """Fraction of each image's Grad-CAM mass inside the (B, 1, H, W) {0,1} patch mask: (B,)."""
    check_images(images)
    region = _check_mask(mask, images)[:, 0].cpu()
    cam = gradcam(model, images, class_idx, layer, device, batch_size)
    return (cam * region).sum(dim=(1, 2))
