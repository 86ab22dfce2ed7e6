"""Gradient alignment: do two models (e.g. fp32 and its 4-bit copy) want the same input change?

Three views of the same pair of input-gradient maps, from pointwise to structural:
``cosine`` (flattened gradients), ``edge_iou`` (overlap of the strongest Sobel edges of |grad|)
and ``hog_cosine`` (cosine of HOG descriptors of |grad|). TriQDef reports low pointwise but high
structural agreement between precisions, which is why a patch made on one transfers to another.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from quantpatch.analysis._common import batches, check_images, evaluating
from quantpatch.errors import ShapeError

# Two-sided 95 % Student-t quantiles t_{0.975, df} for df = 1..30; beyond that a Cornish-Fisher
# expansion around the normal quantile is accurate to < 1e-4.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z975 = 1.959963984540054


def input_gradients(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    """d CE(model(x), y) / dx per image, (N, C, H, W) on the CPU.

    The loss is summed, not averaged, over a batch so each image's gradient does not depend on
    the batch size. Works even when called inside ``torch.inference_mode()``.
    """
    check_images(images, labels)
    model.to(device)
    with evaluating(model), torch.inference_mode(False), torch.enable_grad():
        out = torch.empty(images.shape, dtype=images.dtype)  # a normal tensor, even if the
        for part in batches(len(images), batch_size):  # caller is in inference mode
            x = images[part].to(device).clone().requires_grad_(True)
            y = labels[part].to(device).clone()
            loss = F.cross_entropy(model(x), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
            out[part] = grad.detach().cpu()
    return out


def _as_gray(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) or (B, H, W) -> (B, 1, H, W) channel mean, float32."""
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4:
        raise ShapeError(f"expected (B, C, H, W) or (B, H, W) maps, got {tuple(x.shape)}")
    return x.float().mean(dim=1, keepdim=True)


def _magnitude(grad_x: torch.Tensor, grad_y: torch.Tensor, smooth: float) -> torch.Tensor:
    """|(grad_x, grad_y)|; with ``smooth`` > 0, sqrt(x^2 + y^2 + smooth^2) - smooth, which
    differentiates everywhere (hypot's gradient at a flat pixel is 0/0) for training penalties."""
    if smooth <= 0:
        return torch.hypot(grad_x, grad_y)
    return torch.sqrt(grad_x.square() + grad_y.square() + smooth**2) - smooth


def sobel_edges(x: torch.Tensor, smooth: float = 0.0) -> torch.Tensor:
    """Sobel edge magnitude (B, H, W) of the channel mean of (B, C, H, W) maps.

    The 3x3 Sobel kernels are applied in their separable form (central difference [-1, 0, 1]
    along one axis, smoothing [1, 2, 1] along the other) with slicing rather than a dense
    conv2d: the same operator, but a constant map gives exactly zero (a conv2d sums
    -a - 2a - a + a + 2a + a in an order that can leave ~1e-8). Borders are replicate-padded.
    ``smooth``: see ``_magnitude``.
    """
    gray = F.pad(_as_gray(x), (1, 1, 1, 1), mode="replicate")[:, 0]
    diff_x = gray[:, :, 2:] - gray[:, :, :-2]  # (B, H + 2, W)
    diff_y = gray[:, 2:, :] - gray[:, :-2, :]  # (B, H, W + 2)
    grad_x = diff_x[:, :-2] + 2 * diff_x[:, 1:-1] + diff_x[:, 2:]
    grad_y = diff_y[:, :, :-2] + 2 * diff_y[:, :, 1:-1] + diff_y[:, :, 2:]
    return _magnitude(grad_x, grad_y, smooth)


def _top_mask(edges: torch.Tensor, top: float) -> torch.Tensor:
    """Per image, pixels at or above the k-th largest edge value (k = ceil(top * H * W)).

    Zero-magnitude pixels never count as edges, so a flat map has an empty mask.
    """
    flat = edges.flatten(1)
    k = max(1, math.ceil(top * flat.shape[1]))
    # k-th largest = (n - k + 1)-th smallest; kthvalue is batched over the first dim.
    threshold = flat.kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values
    return (flat >= threshold) & (flat > 0)


def edge_iou(a: torch.Tensor, b: torch.Tensor, top: float = 0.15) -> torch.Tensor:
    """IoU of the top-``top`` Sobel-edge masks of a and b, per image: (B,).

    Two maps with no edges at all (empty union) count as full agreement (1.0).
    """
    if a.shape != b.shape:
        raise ShapeError(f"edge_iou needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not 0.0 < top <= 1.0:
        raise ShapeError(f"top must be in (0, 1], got {top}")
    mask_a = _top_mask(sobel_edges(a), top)
    mask_b = _top_mask(sobel_edges(b), top)
    inter = (mask_a & mask_b).sum(dim=1).float()
    union = (mask_a | mask_b).sum(dim=1).float()
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


def soft_edge_iou(a: torch.Tensor, b: torch.Tensor, smooth: float = 1e-4) -> torch.Tensor:
    """Differentiable Edge IoU per image, (B,): sum(min) / sum(max) of the two Sobel-edge maps,
    each scaled to unit sum, so a training penalty can push two maps' structure apart (the
    top-k masks of ``edge_iou`` have no gradient). 1 for equal structure, 0 for disjoint."""
    if a.shape != b.shape:
        raise ShapeError(
            f"soft_edge_iou needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    edges = [sobel_edges(m, smooth).flatten(1) for m in (a, b)]
    edges = [e / (e.sum(dim=1, keepdim=True) + 1e-12) for e in edges]
    return torch.minimum(*edges).sum(dim=1) / (torch.maximum(*edges).sum(dim=1) + 1e-12)


def hog_descriptor(
    x: torch.Tensor,
    cell: int = 4,
    bins: int = 9,
    block: int | None = 2,
    clip: float = 0.2,
    eps: float = 1e-6,
    smooth: float = 0.0,
) -> torch.Tensor:
    """Batched HOG (Dalal & Triggs) of the channel mean of (B, C, H, W) maps -> (B, D).

    Centred-difference gradients (replicate borders); unsigned orientation in [0, pi) split into
    ``bins`` bins with linear interpolation between the two nearest bin centres, weighted by
    gradient magnitude; summed over ``cell`` x ``cell`` cells (a remainder row/column is dropped).
    With ``block`` set, overlapping ``block`` x ``block`` cell blocks (stride one cell) are
    L2-Hys normalised (L2, clip at ``clip``, L2 again), as in skimage's default; with
    ``block=None`` the raw cell histograms are returned. A constant map gives the zero vector.
    Differentiable through the magnitudes (``smooth`` > 0: see ``_magnitude``); which bins a
    pixel's orientation falls into is never differentiated.
    """
    gray = _as_gray(x)
    batch, _, height, width = gray.shape
    n_h, n_w = height // cell, width // cell
    if cell < 1 or bins < 1 or n_h < 1 or n_w < 1:
        raise ShapeError(f"cannot form {cell}x{cell} cells from {height}x{width} maps")
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx = padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]
    gy = padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]
    magnitude = _magnitude(gx, gy, smooth)
    angle = torch.remainder(torch.atan2(gy.detach(), gx.detach()), math.pi)
    position = angle / (math.pi / bins) - 0.5
    low = torch.floor(position)
    frac = position - low
    low = low.long().remainder(bins)
    hist = torch.zeros(batch, bins, height, width, dtype=gray.dtype, device=gray.device)
    hist.scatter_add_(1, low, magnitude * (1.0 - frac))
    hist.scatter_add_(1, (low + 1).remainder(bins), magnitude * frac)
    cells = F.avg_pool2d(hist[..., : n_h * cell, : n_w * cell], cell) * (cell * cell)
    if block is None:
        return cells.flatten(1)
    if block > min(n_h, n_w):
        raise ShapeError(f"block {block} is larger than the {n_h}x{n_w} cell grid")
    blocks = F.unfold(cells, block)  # (B, bins * block^2, n_blocks)
    blocks = blocks / torch.sqrt((blocks**2).sum(dim=1, keepdim=True) + eps**2)
    blocks = blocks.clamp_max(clip)
    blocks = blocks / torch.sqrt((blocks**2).sum(dim=1, keepdim=True) + eps**2)
    return blocks.transpose(1, 2).flatten(1)


def hog_cosine(a: torch.Tensor, b: torch.Tensor, **hog_kwargs: int | float | None) -> torch.Tensor:
    """Cosine similarity of the HOG descriptors of a and b, per image: (B,)."""
    return F.cosine_similarity(hog_descriptor(a, **hog_kwargs), hog_descriptor(b, **hog_kwargs))


def alignment_metrics(
    grad_a: torch.Tensor, grad_b: torch.Tensor, *, chance: bool = False
) -> dict[str, torch.Tensor]:
    """Per-image agreement of two stacks of gradient maps (B, C, H, W), each value (B,):

    ``cosine``: cosine of the flattened signed gradients (pointwise agreement);
    ``edge_iou``: IoU of the top-15 % Sobel edges of |grad| (where the structure is);
    ``hog_cosine``: cosine of HOG descriptors of |grad| (how the structure is oriented).

    ``chance=True`` adds ``<metric>_chance``: the same metrics with image i of ``grad_a``
    paired with its neighbour i-1 (cyclic) of ``grad_b`` (needs B >= 2). That is the level
    two unrelated gradient maps reach, e.g. ~0.08 Edge IoU (random 15 % masks) and a high HOG
    cosine, because HOG vectors are non-negative and block-normalised; read the real values
    against it. Pure, so gradients computed once can be paired many times.
    """
    if grad_a.shape != grad_b.shape:
        raise ShapeError(f"need equal shapes, got {tuple(grad_a.shape)} and {tuple(grad_b.shape)}")
    result = {
        "cosine": F.cosine_similarity(grad_a.flatten(1), grad_b.flatten(1), dim=1),
        "edge_iou": edge_iou(grad_a.abs(), grad_b.abs()),
        "hog_cosine": hog_cosine(grad_a.abs(), grad_b.abs()),
    }
    if chance:
        if len(grad_a) < 2:
            raise ShapeError("the chance level needs at least 2 images")
        shuffled = alignment_metrics(grad_a, grad_b.roll(1, dims=0))
        result.update({f"{key}_chance": value for key, value in shuffled.items()})
    return result


def gradient_alignment(
    model_a: nn.Module,
    model_b: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    batch_size: int = 256,
    chance: bool = False,
) -> dict[str, torch.Tensor]:
    """``alignment_metrics`` of the two models' input gradients on ``images`` (each value
    (B,), CPU): cosine, edge_iou, hog_cosine, and with ``chance=True`` their chance levels."""
    if chance and len(images) < 2:
        raise ShapeError("the chance level needs at least 2 images")
    grad_a = input_gradients(model_a, images, labels, device, batch_size)
    grad_b = input_gradients(model_b, images, labels, device, batch_size)
    return alignment_metrics(grad_a, grad_b, chance=chance)


def _t975(df: int) -> float:
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def mean_ci(values: torch.Tensor) -> dict[str, float | int]:
    """Mean, sample std, n and a 95 % Student-t interval for the mean (``mean ± half_width``).

    The t interval (df = n - 1) is exact for normal data and the usual choice for per-image
    similarity scores; it tends to the normal interval for large n. With n < 2 the std and
    interval are NaN; non-finite values are dropped first (e.g. a cosine of a zero gradient).
    """
    flat = values.detach().flatten().double().cpu()
    flat = flat[torch.isfinite(flat)]
    n = int(flat.numel())
    mean = float(flat.mean()) if n else float("nan")
    std = float(flat.std(unbiased=True)) if n > 1 else float("nan")
    half = _t975(n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
    return {
        "mean": mean,
        "std": std,
        "n": n,
        "half_width": half,
        "ci_low": mean - half,
        "ci_high": mean + half,
    }
