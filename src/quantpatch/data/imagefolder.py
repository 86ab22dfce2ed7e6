"""``imagefolder``: any class-per-folder image tree, read with torchvision's ``ImageFolder``.

Layout: ``<root>/train/<class>/*.png|jpg|...`` and ``<root>/val/<class>/...`` (or
``<root>/test/<class>/...``). Classes are the train folder names (sorted); every val/test
class must also exist under train. Images are converted to RGB, resized (shorter side) and
centre-cropped to ``image_size`` (default 224), and loaded into memory in batches through a
single-process ``DataLoader`` (fine for modest sizes; use ``limit`` for quick runs). Mean/std
are the ImageNet defaults.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from quantpatch.data._common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_image_size,
    limit_indices,
    require_root,
)
from quantpatch.data._registry import DATASETS
from quantpatch.data._types import Dataset, Split
from quantpatch.errors import CorruptFileError, DataNotFoundError

DEFAULT_IMAGE_SIZE = 224
LAYOUT = "<root>/train/<class>/<image> and <root>/val/<class>/<image> (or <root>/test/...)"


def _folder(path: Path, transform, target_transform=None):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(path), transform=transform, target_transform=target_transform)
    except FileNotFoundError as exc:  # no class folders, or a class folder without images
        raise DataNotFoundError(f"imagefolder: {path}: {exc}; expected {LAYOUT}") from exc


def _load(folder, limit: int | None, seed: int, batch_size: int = 64) -> Split:
    from torch.utils.data import DataLoader, Subset

    idx = limit_indices(len(folder), limit, seed)
    source = folder if idx is None else Subset(folder, [int(i) for i in idx])
    loader = DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=0)
    images, labels = [], []
    try:
        for x, y in loader:
            images.append(x)
            labels.append(y)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL: UnidentifiedImageError, truncation
        raise CorruptFileError(
            f"imagefolder: cannot decode an image under {folder.root}: {exc}"
        ) from exc
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
        train=_load(train, limit, seed),
        test=_load(test, limit, seed + 1),
        classes=tuple(train.classes),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
