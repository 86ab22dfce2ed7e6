"""``mnist``, ``fashion-mnist`` and ``svhn`` from their standard on-disk formats.

* MNIST / Fashion-MNIST: the idx files torchvision uses, ``<root>/MNIST/raw/`` and
  ``<root>/FashionMNIST/raw/`` (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``; the ``.gz`` originals are read too).
  The idx files are parsed here with numpy (strict size checks) instead of through
  ``torchvision.datasets.MNIST``, whose constructor prefers a legacy ``processed/*.pt`` file
  and would ``torch.load`` (unpickle) it. Downloads use torchvision's mirror list and MD5s.
* SVHN: ``<root>/train_32x32.mat`` and ``<root>/test_32x32.mat`` read with
  ``scipy.io.loadmat`` (MATLAB v5 format, no unpickling) exactly as
  ``torchvision.datasets.SVHN`` does, minus its MD5 check (so re-packed files also load);
  label 10 means digit 0.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from quantpatch.data._common import require_root, uint8_split
from quantpatch.data._registry import DATASETS
from quantpatch.data._types import Dataset
from quantpatch.errors import CorruptFileError, DataNotFoundError

# --------------------------------------------------------------------------- idx (MNIST)

_IDX_UBYTE = 0x08


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise CorruptFileError(f"cannot read {path}: {exc}") from exc


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an idx file of unsigned bytes with ``ndim`` dimensions (strict size check)."""
    data = _read_bytes(path)
    if len(data) < 4:
        raise CorruptFileError(f"{path}: too short for an idx header ({len(data)} bytes)")
    zero, dtype_code, nd = int.from_bytes(data[0:2], "big"), data[2], data[3]
    if zero != 0 or dtype_code != _IDX_UBYTE or nd != ndim:
        raise CorruptFileError(
            f"{path}: not an idx{ndim}-ubyte file (magic {data[:4].hex()}, "
            f"expected 0000{_IDX_UBYTE:02x}{ndim:02x})"
        )
    header = 4 + 4 * nd
    if len(data) < header:
        raise CorruptFileError(f"{path}: truncated idx header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise CorruptFileError(
            f"{path}: {len(data)} bytes but header shape {shape} needs {expected}"
        )
    return np.frombuffer(bytearray(data), dtype=np.uint8, offset=header).reshape(shape)


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
        images = read_idx(files[f"{prefix}-images-idx3-ubyte"], 3)
        labels = read_idx(files[f"{prefix}-labels-idx1-ubyte"], 1)
        if images.shape[0] != labels.shape[0]:
            raise CorruptFileError(
                f"{name}: {prefix} has {images.shape[0]} images but {labels.shape[0]} labels"
            )
        if labels.size and int(labels.max()) >= len(classes):
            raise CorruptFileError(f"{name}: {prefix} label {int(labels.max())} out of range")
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


# --------------------------------------------------------------------------- SVHN

SVHN_LAYOUT = "<root>/train_32x32.mat and <root>/test_32x32.mat (SVHN format 2, MATLAB v5)"


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, 32, 32) uint8 images and (N,) labels in 0..9 from an SVHN ``.mat`` file."""
    try:
        import scipy.io as sio
    except ImportError as exc:
        raise DataNotFoundError("svhn: reading .mat files needs scipy (pip install scipy)") from exc
    try:
        mat = sio.loadmat(str(path), variable_names=["X", "y"])
    except NotImplementedError as exc:  # MATLAB v7.3 (HDF5) files
        raise CorruptFileError(f"svhn: {path} is a MATLAB v7.3 file; expected v5: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for bad files
        raise CorruptFileError(f"svhn: cannot read {path}: {exc}") from exc
    if "X" not in mat or "y" not in mat:
        raise CorruptFileError(f"svhn: {path} lacks the X and y variables")
    X, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    if X.ndim != 4 or X.shape[:3] != (32, 32, 3):
        raise CorruptFileError(f"svhn: {path} X has shape {X.shape}, expected (32, 32, 3, N)")
    y = y.reshape(-1).astype(np.int64)
    if y.shape[0] != X.shape[3]:
        raise CorruptFileError(f"svhn: {path} has {X.shape[3]} images but {y.shape[0]} labels")
    if y.size and (y.min() < 0 or y.max() > 10):
        raise CorruptFileError(f"svhn: {path} labels outside 0..10")
    y[y == 10] = 0  # SVHN stores digit 0 as label 10
    if X.dtype != np.uint8:
        if X.size and (X.min() < 0 or X.max() > 255):
            raise CorruptFileError(f"svhn: {path} pixels outside 0..255")
        X = X.astype(np.uint8)
    return np.transpose(X, (3, 2, 0, 1)), y  # (H, W, C, N) -> (N, C, H, W), as torchvision


@DATASETS.register
def svhn(
    root: Path | None,
    *,
    download: bool = False,
    seed: int = 0,
    image_size: int | None = None,
    limit: int | None = None,
) -> Dataset:
    """SVHN cropped digits (73,257/26,032 32x32 RGB) from <root>/{train,test}_32x32.mat."""
    root = require_root("svhn", root, SVHN_LAYOUT, download=download)
    if download:
        from torchvision.datasets import SVHN
        from torchvision.datasets.utils import download_url

        for split_name in ("train", "test"):
            url, filename, md5 = SVHN.split_list[split_name]
            if not (root / filename).is_file():
                download_url(url, str(root), filename, md5)
    splits = []
    for offset, filename in enumerate(("train_32x32.mat", "test_32x32.mat")):
        path = root / filename
        if not path.is_file():
            raise DataNotFoundError(
                f"svhn: expected {SVHN_LAYOUT}; missing {path} (pass --download to fetch)"
            )
        images, labels = _read_svhn_mat(path)
        splits.append(
            uint8_split(images, labels, limit=limit, seed=seed + offset, image_size=image_size)
        )
    return Dataset(
        name="svhn",
        train=splits[0],
        test=splits[1],
        classes=tuple(str(i) for i in range(10)),
        mean=(0.4377, 0.4438, 0.4728),
        std=(0.1980, 0.2010, 0.1970),
    )
