"""Helpers shared by the dataset loaders (not part of the public API)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from quantpatch.data._types import Split
from quantpatch.errors import ConfigError, DataNotFoundError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MAX_SPLIT_BYTES = 2**31
"""Most uint8 bytes one data file (or one decoded split) may hold; float32 in memory is 4x.
The real files are far smaller (CIFAR-100 train: 154 MB), so a header or file claiming more is
refused before it is read instead of ending in a MemoryError."""


def require_root(name: str, root: Path | None, layout: str, *, download: bool = False) -> Path:
    """Return ``root`` as a Path, or raise ``DataNotFoundError`` if it is ``None`` or (unless we
    are about to download into it) missing."""
    if root is None:
        raise DataNotFoundError(f"{name}: needs a data root (pass --data-root); expected {layout}")
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise DataNotFoundError(f"{name}: data root {root} is not a directory; expected {layout}")
    if not root.is_dir() and not download:
        raise DataNotFoundError(f"{name}: data root {root} does not exist; expected {layout}")
    return root


def check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")


def check_image_size(image_size: int | None) -> None:
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ConfigError(f"image_size must be a positive integer or None, got {image_size!r}")


def limit_indices(n: int, limit: int | None, seed: int) -> np.ndarray | None:
    """Indices of the first ``limit`` items after a seeded shuffle, or ``None`` for "all"
    (the natural file order is kept when no limit applies)."""
    check_limit(limit)
    if limit is None or limit >= n:
        return None
    return np.random.default_rng(seed).permutation(n)[:limit]


def resize_images(images: torch.Tensor, image_size: int | None, chunk: int = 1024) -> torch.Tensor:
    """Resize square-ish (N, C, H, W) images to ``image_size`` (bilinear, antialiased) when it
    differs from their size; a no-op for ``None`` or the native size."""
    check_image_size(image_size)
    if image_size is None or tuple(images.shape[-2:]) == (image_size, image_size):
        return images
    out = [
        F.interpolate(
            images[i : i + chunk],
            size=(image_size, image_size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        ).clamp_(0.0, 1.0)
        for i in range(0, images.shape[0], chunk)
    ]
    if not out:
        return images.new_zeros((0, images.shape[1], image_size, image_size))
    return torch.cat(out)


def uint8_split(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    limit: int | None,
    seed: int,
    image_size: int | None = None,
) -> Split:
    """Build a float32 [0, 1] ``Split`` from uint8 (N, C, H, W) images and integer labels.

    ``limit`` is applied before the float conversion (and the optional resize) so quick runs
    stay cheap.
    """
    idx = limit_indices(len(labels), limit, seed)
    if idx is not None:
        images, labels = images[idx], labels[idx]
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).to(torch.float32).div_(255.0)
    y = torch.from_numpy(np.array(labels, dtype=np.int64))
    return Split(resize_images(x, image_size), y)
