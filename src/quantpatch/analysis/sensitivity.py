"""Spatial lens: does a patch work everywhere, or only at some positions?

``spatial_asr_map`` pastes one fixed patch at every position of a stride grid and measures the
attack success rate per position. Images x positions are evaluated in large flat chunks: each
chunk gathers its images with one index op and pastes the patch into all of them with the
attacks' exact-position kernel (``attacks.placement.paste_at``), so there is no Python loop
over positions.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from quantpatch.analysis._common import batches, check_images, evaluating
from quantpatch.attacks.placement import paste_at
from quantpatch.errors import PatchTooLargeError, ShapeError


def patch_size_pixels(area_fraction: float, image_size: int | tuple[int, int]) -> int:
    """Side of a square patch covering ``area_fraction`` of the image: round(sqrt(f*H*W)) >= 1.

    Halves round up (not Python's banker's rounding), so the result is monotone in the fraction.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if not area_fraction > 0:
        raise ShapeError(f"area_fraction must be > 0, got {area_fraction}")
    side = max(1, math.floor(math.sqrt(area_fraction * height * width) + 0.5))
    if side > min(height, width):
        raise PatchTooLargeError(
            f"a patch of {area_fraction:.3g} of the image ({side} px) does not fit {height}x{width}"
        )
    return side


def _check_patch(patch: torch.Tensor, mask: torch.Tensor | None, images: torch.Tensor) -> None:
    _, channels, height, width = images.shape
    if patch.ndim != 3 or patch.shape[0] not in (1, channels):
        raise ShapeError(f"patch must be ({channels}, ph, pw), got {tuple(patch.shape)}")
    if patch.shape[1] > height or patch.shape[2] > width:
        raise PatchTooLargeError(
            f"patch {patch.shape[1]}x{patch.shape[2]} does not fit {height}x{width} images"
        )
    if mask is not None and (mask.ndim != 3 or mask.shape[1:] != patch.shape[1:]):
        raise ShapeError(f"mask must be (1 or C, ph, pw) like the patch, got {tuple(mask.shape)}")


def grid_positions(
    image_hw: tuple[int, int], patch_hw: tuple[int, int], stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left rows and columns of the grid: 0, stride, ... up to H - ph (and W - pw)."""
    if stride < 1:
        raise ShapeError(f"stride must be >= 1, got {stride}")
    rows = torch.arange(0, image_hw[0] - patch_hw[0] + 1, stride)
    cols = torch.arange(0, image_hw[1] - patch_hw[1] + 1, stride)
    return rows, cols


def _predict(model: nn.Module, images: torch.Tensor, device, batch_size: int) -> torch.Tensor:
    out = torch.empty(len(images), dtype=torch.long, device=device)
    for part in batches(len(images), batch_size):
        out[part] = model(images[part].to(device)).argmax(dim=1)
    return out


def spatial_asr_map(
    model: nn.Module,
    patch: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    stride: int = 2,
    device: torch.device,
    batch_size: int = 4096,
    target: int | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """ASR of a fixed patch at every top-left position (rows 0..H-ph, cols 0..W-pw, step stride).

    Untargeted: over the n images the model classifies correctly when clean, the share
    misclassified with the patch. Targeted: over the n images the model classifies correctly
    when clean and whose true class is not ``target`` (the convention of
    ``quantpatch.metrics.attack_success``), the share predicted as ``target``. Returns (rates (ny, nx) on the CPU, NaN if n == 0; n). ``batch_size`` bounds the
    number of pasted images per forward pass; ``mask`` (1 or C, ph, pw) blends a shaped patch.
    """
    check_images(images, labels)
    _check_patch(patch, mask, images)
    model.to(device)
    rows, cols = grid_positions(images.shape[2:], patch.shape[1:], stride)
    n_loc = len(rows) * len(cols)
    tops = rows.repeat_interleave(len(cols)).to(device)
    lefts = cols.repeat(len(rows)).to(device)
    with evaluating(model), torch.inference_mode():
        images = images.to(device)
        labels = labels.to(device)
        patch = patch.to(device, images.dtype).expand(images.shape[1], -1, -1)
        clean = _predict(model, images, device, batch_size)
        eligible = clean == labels
        if target is not None:
            eligible &= labels != target
        pool, pool_labels = images[eligible].contiguous(), labels[eligible]
        n = len(pool)
        hits = torch.zeros(n_loc, dtype=torch.long, device=device)
        for part in batches(n * n_loc, batch_size):
            flat = torch.arange(part.start, part.stop, device=device)
            image_idx, loc = flat // n_loc, flat % n_loc
            batch = paste_at(pool[image_idx], patch, tops[loc], lefts[loc], mask)
            pred = model(batch).argmax(dim=1)
            success = pred != pool_labels[image_idx] if target is None else pred == target
            hits.index_add_(0, loc, success.long())
    rates = hits.cpu().double() / n if n else torch.full((n_loc,), float("nan"))
    return rates.reshape(len(rows), len(cols)).float(), n


def _sync(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _plain_inference(model, tile: torch.Tensor, total: int, batch_size: int) -> None:
    for part in batches(total, batch_size):
        model(tile[: part.stop - part.start]).argmax(dim=1)


def benchmark_spatial(
    model: nn.Module,
    patch: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    stride: int = 2,
    device: torch.device,
    batch_size: int = 4096,
    target: int | None = None,
    repeats: int = 3,
) -> dict[str, float]:
    """Time ``spatial_asr_map`` against plain batched inference of the same number of images.

    The baseline runs the model on a ready-made batch of ``batch_size`` images (no gathering,
    no pasting) for n * n_locations images, so ``throughput_ratio`` = baseline time / map time
    is the share of pure-inference throughput the map achieves (the clean pass that selects
    the n eligible images is counted against the map). After one warm-up, the two are timed
    alternately ``repeats`` times and the fastest run of each is kept, to damp machine noise.
    """
    model.to(device)
    args = dict(stride=stride, device=device, batch_size=batch_size, target=target)
    rates, n = spatial_asr_map(model, patch, images, labels, **args)  # warm-up
    total = n * rates.numel()
    tile = images.to(device)
    tile = tile[torch.arange(min(batch_size, max(total, 1)), device=device) % len(tile)]
    map_s, plain_s = float("inf"), float("inf")
    for _ in range(max(1, repeats)):
        _sync(device)
        start = time.perf_counter()
        spatial_asr_map(model, patch, images, labels, **args)
        _sync(device)
        map_s = min(map_s, time.perf_counter() - start)
        with evaluating(model), torch.inference_mode():
            start = time.perf_counter()
            _plain_inference(model, tile, total, batch_size)
            _sync(device)
            plain_s = min(plain_s, time.perf_counter() - start)
    return {
        "evaluations": float(total),
        "map_s": map_s,
        "plain_s": plain_s,
        "map_images_per_s": total / map_s,
        "plain_images_per_s": total / plain_s if plain_s > 0 else float("nan"),
        "throughput_ratio": plain_s / map_s,
    }
