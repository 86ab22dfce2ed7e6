"""Datasets: every loader returns a ``Dataset`` of float32 (N, C, H, W) images in [0, 1].

``mnist5k`` is the embedded default (no download, no data root). The others read the standard
on-disk formats from a local ``root`` and download only when ``download=True``.
"""

from __future__ import annotations

from pathlib import Path

from quantpatch.data._registry import DATASETS
from quantpatch.data._types import Dataset, Split

# Importing the loader modules registers them (mnist5k first: it is the default).
from quantpatch.data import mnist5k as _mnist5k  # noqa: F401  isort: skip
from quantpatch.data import torchvision_sets as _torchvision_sets  # noqa: F401  isort: skip
from quantpatch.data import svhn as _svhn  # noqa: F401  isort: skip
from quantpatch.data import cifar as _cifar  # noqa: F401  isort: skip
from quantpatch.data import imagefolder as _imagefolder  # noqa: F401  isort: skip

DEFAULT_DATASET = "mnist5k"


def load_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    download: bool = False,
    seed: int = 0,
    image_size: int | None = None,
    limit: int | None = None,
) -> Dataset:
    """Load the dataset registered as ``name`` (``UnknownNameError`` lists the choices)."""
    factory = DATASETS.get(name)
    return factory(
        Path(root).expanduser() if root is not None else None,
        download=download,
        seed=seed,
        image_size=image_size,
        limit=limit,
    )


__all__ = ["DATASETS", "DEFAULT_DATASET", "Dataset", "Split", "load_dataset"]
