"""``mnist`` and ``fashion-mnist`` from torchvision's on-disk idx files (SVHN: ``svhn.py``).

* MNIST / Fashion-MNIST: the idx files torchvision uses, ``<root>/MNIST/raw/`` and
  ``<root>/FashionMNIST/raw/`` (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``; the ``.gz`` originals are read too).
  The idx files are parsed here with numpy (strict size checks) instead of through
  ``torchvision.datasets.MNIST``, whose constructor prefers a legacy ``processed/*.pt`` file
  and would ``torch.load`` (unpickle) it. Downloads use torchvision's mirror list and MD5s.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from quantpatch.data._common import MAX_SPLIT_BYTES, require_root, uint8_split
from quantpatch.data._registry import DATASETS
from quantpatch.data._types import Dataset
from quantpatch.errors import CorruptFileError, DataNotFoundError

# --------------------------------------------------------------------------- idx (MNIST)

_IDX_UBYTE = 0x08
MNIST_SHAPE = (28, 28)


def read_idx(path: Path, item_shape: tuple[int, ...]) -> np.ndarray:
    """Read an idx file of unsigned bytes holding N items of ``item_shape`` (``()`` for labels).

    The header is checked before the payload is read, and at most the byte count it implies
    (+1, to detect trailing data) is read or decompressed: a truncated, padded or
    decompression-bomb ``.gz`` is a ``CorruptFileError`` naming the file, never a MemoryError."""
    ndim = 1 + len(item_shape)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] != _IDX_UBYTE or magic[3] != ndim:
                raise CorruptFileError(
                    f"{path}: not an idx{ndim}-ubyte file (magic {magic.hex()}, "
                    f"expected 0000{_IDX_UBYTE:02x}{ndim:02x})"
                )
            dims = f.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise CorruptFileError(f"{path}: truncated idx header")
            shape = struct.unpack(f">{ndim}I", dims)
            size = _check_idx_shape(path, shape, item_shape)
            data = f.read(size + 1)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise CorruptFileError(f"cannot read {path}: {exc}") from None
    if len(data) != size:
        problem = "truncated" if len(data) < size else "has data after"
        raise CorruptFileError(
            f"{path}: {problem} the {size} bytes its header shape {shape} describes"
        )
    return np.frombuffer(bytearray(data), dtype=np.uint8).reshape(shape)


def _check_idx_shape(path: Path, shape: tuple[int, ...], item_shape: tuple[int, ...]) -> int:
    """The payload size ``shape`` implies, after refusing empty, misshapen or absurd headers."""
    if tuple(shape[1:]) != item_shape:
        items = "x".join(map(str, shape[1:]))
        raise CorruptFileError(
            f"{path}: items are {items}, expected {'x'.join(map(str, item_shape))}"
        )
    if shape[0] == 0:
        raise CorruptFileError(f"{path}: the header says it holds no items")
    size = math.prod(shape)
    if size > MAX_SPLIT_BYTES:
        raise CorruptFileError(
            f"{path}: header shape {shape} claims {size} bytes, more than the "
            f"{MAX_SPLIT_BYTES >> 30} GiB limit"
        )
    return size


def _idx_file(raw: Path, stem: str) -> Path | None:
    for candidate in (raw / stem, raw / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _download_idx(tv_cls, raw: Path) -> None:
    """Fetch the idx files with torchvision's mirrors and MD5s (same logic as ``tv_cls.download``,
    without constructing the dataset and its legacy-pickle path)."""
    from torchvision.datasets.utils import download_and_extract_archive

    raw.mkdir(parents=True, exist_ok=True)
    for filename, md5 in tv_cls.resources:
        if (raw / filename.removesuffix(".gz")).is_file():
            continue
        errors = []
        for mirror in tv_cls.mirrors:
            try:
                download_and_extract_archive(
                    f"{mirror}{filename}", download_root=str(raw), filename=filename, md5=md5
                )
                break
            except Exception as exc:  # noqa: BLE001 - try the next mirror, report all at the end
                errors.append(f"{mirror}: {exc}")
        else:
            raise DataNotFoundError(f"could not download {filename}: " + "; ".join(errors))


def _load_idx_dataset(
    name: str,
    folder: str,
    tv_cls_name: str,
    classes: tuple[str, ...],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    root: Path | None,
    download: bool,
    seed: int,
    image_size: int | None,
    limit: int | None,
) -> Dataset:
    layout = (
        f"<root>/{folder}/raw/train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (or their .gz)"
    )
    root = require_root(name, root, layout, download=download)
    raw = root / folder / "raw"
    stems = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )
    if download and any(_idx_file(raw, s) is None for s in stems):
        import torchvision.datasets as tvd

        _download_idx(getattr(tvd, tv_cls_name), raw)
    files = {s: _idx_file(raw, s) for s in stems}
    missing = [s for s, p in files.items() if p is None]
    if missing:
        raise DataNotFoundError(
            f"{name}: expected {layout}; missing {raw / missing[0]} (pass --download to fetch)"
        )

    def split(prefix: str, split_seed: int):
        images_file = files[f"{prefix}-images-idx3-ubyte"]
        labels_file = files[f"{prefix}-labels-idx1-ubyte"]
        images, labels = read_idx(images_file, MNIST_SHAPE), read_idx(labels_file, ())
        if images.shape[0] != labels.shape[0]:
            raise CorruptFileError(
                f"{name}: {images_file} has {images.shape[0]} images but {labels_file} has "
                f"{labels.shape[0]} labels"
            )
        if int(labels.max()) >= len(classes):
            raise CorruptFileError(
                f"{labels_file}: label {int(labels.max())} out of range 0..{len(classes) - 1}"
            )
        return uint8_split(
            images[:, None], labels, limit=limit, seed=split_seed, image_size=image_size
        )

    return Dataset(
        name=name,
        train=split("train", seed),
        test=split("t10k", seed + 1),
        classes=classes,
        mean=mean,
        std=std,
    )


@DATASETS.register
def mnist(
    root: Path | None,
    *,
    download: bool = False,
    seed: int = 0,
    image_size: int | None = None,
    limit: int | None = None,
) -> Dataset:
    """MNIST, 60,000/10,000 28x28 digits from the idx files under <root>/MNIST/raw."""
    return _load_idx_dataset(
        "mnist",
        "MNIST",
        "MNIST",
        tuple(str(i) for i in range(10)),
        (0.1307,),
        (0.3081,),
        root,
        download,
        seed,
        image_size,
        limit,
    )


FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@DATASETS.register("fashion-mnist")  # not an identifier, so named explicitly
def fashion_mnist(
    root: Path | None,
    *,
    download: bool = False,
    seed: int = 0,
    image_size: int | None = None,
    limit: int | None = None,
) -> Dataset:
    """Fashion-MNIST, 60,000/10,000 28x28 images from <root>/FashionMNIST/raw."""
    return _load_idx_dataset(
        "fashion-mnist",
        "FashionMNIST",
        "FashionMNIST",
        FASHION_CLASSES,
        (0.2860,),
        (0.3530,),
        root,
        download,
        seed,
        image_size,
        limit,
    )
