"""``imagefolder``: any class-per-folder image tree, read with torchvision's ``ImageFolder``.

Layout: ``<root>/train/<class>/*.png|jpg|...`` and ``<root>/val/<class>/...`` (or
``<root>/test/<class>/...``). Classes are the train folder names (sorted); every val/test
class must also exist under train. Images are converted to RGB, resized (shorter side) and
centre-cropped to ``image_size`` (default 224), and loaded into memory in batches through a
single-process ``DataLoader`` (fine for modest sizes; use ``limit`` for quick runs). Mean/std
are the ImageNet defaults.

Images are untrusted input: each header is checked before its pixels are decoded (at most
``MAX_IMAGE_PIXELS`` pixels and a side ratio of at most ``MAX_ASPECT``, so neither the decode
nor the shorter-side resize can blow up), every decode failure is a ``CorruptFileError`` naming
the file, and a split whose decoded size would pass ``MAX_SPLIT_BYTES`` is refused up front.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from quantpatch.data._common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_SPLIT_BYTES,
    check_image_size,
    limit_indices,
    require_root,
)
from quantpatch.data._registry import DATASETS
from quantpatch.data._types import Dataset, Split
from quantpatch.errors import ConfigError, CorruptFileError, DataNotFoundError

DEFAULT_IMAGE_SIZE = 224
LAYOUT = "<root>/train/<class>/<image> and <root>/val/<class>/<image> (or <root>/test/...)"
MAX_IMAGE_PIXELS = 64_000_000  # an 8000x8000 photo; PIL only refuses beyond ~179 M
MAX_ASPECT = 64  # longer side / shorter side


def _open_image(path: str):
    """Decode one image as RGB after checking its header against the pixel and aspect limits;
    any failure is a ``CorruptFileError`` naming the file (the ``ImageFolder`` loader)."""
    from PIL import Image

    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            image = Image.open(f)
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise CorruptFileError(
                    f"imagefolder: {path} is {width}x{height} pixels, more than the "
                    f"{MAX_IMAGE_PIXELS // 10**6} megapixel limit"
                )
            if max(width, height) > MAX_ASPECT * min(width, height):
                raise CorruptFileError(
                    f"imagefolder: {path} is {width}x{height} pixels, sides more than "
                    f"{MAX_ASPECT}:1 apart"
                )
            return image.convert("RGB")
    except CorruptFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types (bomb, truncation, syntax)
        raise CorruptFileError(f"imagefolder: cannot decode {path}: {exc}") from None


def _folder(path: Path, transform, target_transform=None):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(
            str(path), transform=transform, target_transform=target_transform, loader=_open_image
        )
    except OSError as exc:  # no class folders, a class folder without images, no permission
        raise DataNotFoundError(f"imagefolder: {path}: {exc}; expected {LAYOUT}") from None


def _load(folder, limit: int | None, seed: int, size: int, batch_size: int = 64) -> Split:
    from torch.utils.data import DataLoader, Subset

    idx = limit_indices(len(folder), limit, seed)
    n = len(folder) if idx is None else len(idx)
    if n * 3 * size * size > MAX_SPLIT_BYTES:
        raise ConfigError(
            f"imagefolder: {n} images of {size}x{size} under {folder.root} would need "
            f"{n * 3 * size * size * 4 / 2**30:.0f} GiB in memory; pass a limit of at most "
            f"{MAX_SPLIT_BYTES // (3 * size * size)} (--limit) or a smaller image size"
        )
    source = folder if idx is None else Subset(folder, [int(i) for i in idx])
    loader = DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=0)
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.append(y)
    return Split(
        torch.cat(images).to(torch.float32).contiguous(), torch.cat(labels).to(torch.int64)
    )


@DATASETS.register
def imagefolder(
    root: Path | None,
    *,
    download: bool = False,
    seed: int = 0,
    image_size: int | None = None,
    limit: int | None = None,
) -> Dataset:
    """Class-per-folder images (<root>/train, <root>/val or test), resized and centre-cropped."""
    del download  # a local folder tree: there is nothing to fetch
    root = require_root("imagefolder", root, LAYOUT)
    from torchvision import transforms

    check_image_size(image_size)
    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    train_dir = root / "train"
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        missing = train_dir if not train_dir.is_dir() else root / "val"
        raise DataNotFoundError(f"imagefolder: expected {LAYOUT}; missing {missing}")
    transform = transforms.Compose(
        [transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()]
    )
    train = _folder(train_dir, transform)
    probe = _folder(test_dir, None)  # only to read its class names
    unknown = sorted(set(probe.classes) - set(train.classes))
    if unknown:
        raise DataNotFoundError(
            f"imagefolder: {test_dir} has classes not under {train_dir}: {', '.join(unknown[:5])}"
        )
    remap = np.array([train.class_to_idx[c] for c in probe.classes], dtype=np.int64)
    test = _folder(test_dir, transform, target_transform=lambda t: int(remap[t]))
    return Dataset(
        name="imagefolder",
        train=_load(train, limit, seed, size),
        test=_load(test, limit, seed + 1, size),
        classes=tuple(train.classes),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
