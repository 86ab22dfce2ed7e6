"""``cifar10`` and ``cifar100`` from the official *binary* distributions, read with numpy.

The popular "python version" of CIFAR is a set of pickles, and quantpatch never unpickles user
files, so only the binary version is accepted:

* ``<root>/cifar-10-batches-bin/``: ``data_batch_1.bin`` .. ``data_batch_5.bin``,
  ``test_batch.bin`` (records of 1 label byte + 3,072 pixel bytes, channel-major 3x32x32) and
  ``batches.meta.txt`` (class names, one per line).
* ``<root>/cifar-100-binary/``: ``train.bin``, ``test.bin`` (records of 1 coarse + 1 fine label
  byte + 3,072 pixel bytes; the fine label is used) and ``fine_label_names.txt``.

The class-name files are optional (the standard names are built in). ``download=True`` fetches
the official binary archive (MD5-checked) with torchvision's ``download_and_extract_archive``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quantpatch.data._common import MAX_SPLIT_BYTES, require_root, uint8_split
from quantpatch.data._registry import DATASETS
from quantpatch.data._types import Dataset
from quantpatch.errors import CorruptFileError, DataNotFoundError

PIXELS = 3 * 32 * 32

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# fmt: off
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)
# fmt: on
CIFAR100_COARSE_CLASSES = 20

_SPECS = {
    "cifar10": dict(
        folder="cifar-10-batches-bin",
        pickled="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        test=("test_batch.bin",),
        label_bytes=1,
        names_file="batches.meta.txt",
        classes=CIFAR10_CLASSES,
        url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        md5="c32a1d4ab5d03f1284b67883e8d87530",
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": dict(
        folder="cifar-100-binary",
        pickled="cifar-100-python",
        train=("train.bin",),
        test=("test.bin",),
        label_bytes=2,
        names_file="fine_label_names.txt",
        classes=CIFAR100_CLASSES,
        url="https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        md5="03b5dce01913d631647c71ecec9e9cb8",
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}


MAX_NAMES_BYTES = 64 * 2**10  # a class-name file is a few hundred bytes


def read_cifar_bin(path: Path, label_bytes: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, 32, 32) uint8 images and (N,) labels from one CIFAR binary file.

    The last label byte of each record is the class (CIFAR-100: the fine label, whose coarse
    label byte must be < 20). The size is checked before anything is read."""
    record = label_bytes + PIXELS
    try:
        size = path.stat().st_size
        if size == 0 or size % record:
            raise CorruptFileError(
                f"{path}: {size} bytes is not a whole number of {record}-byte CIFAR records"
            )
        if size > MAX_SPLIT_BYTES:
            raise CorruptFileError(f"{path}: larger than {MAX_SPLIT_BYTES >> 30} GiB")
        data = np.fromfile(path, dtype=np.uint8, count=size)
    except OSError as exc:
        raise CorruptFileError(f"cannot read {path}: {exc}") from None
    if data.size != size:
        raise CorruptFileError(f"{path}: changed while being read")
    rows = data.reshape(-1, record)
    labels = rows[:, label_bytes - 1].astype(np.int64)
    if labels.max() >= num_classes:
        raise CorruptFileError(
            f"{path}: label {int(labels.max())} out of range 0..{num_classes - 1}"
        )
    if label_bytes == 2 and rows[:, 0].max() >= CIFAR100_COARSE_CLASSES:
        raise CorruptFileError(f"{path}: coarse label {int(rows[:, 0].max())} out of range 0..19")
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32), labels


def _read_names(path: Path, default: tuple[str, ...]) -> tuple[str, ...]:
    if not path.is_file():
        return default
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_NAMES_BYTES + 1)
        if len(raw) > MAX_NAMES_BYTES:
            raise CorruptFileError(f"{path}: larger than {MAX_NAMES_BYTES >> 10} KiB")
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"cannot read class names from {path}: {exc}") from None
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != len(default):
        raise CorruptFileError(f"{path}: {len(names)} class names, expected {len(default)}")
    if len(set(names)) != len(names):
        raise CorruptFileError(f"{path}: class names repeat")
    return names


def _load_cifar(
    name: str,
    root: Path | None,
    download: bool,
    seed: int,
    image_size: int | None,
    limit: int | None,
) -> Dataset:
    spec = _SPECS[name]
    folder, files = spec["folder"], spec["train"] + spec["test"]
    layout = f"<root>/{folder}/{files[0]}" + (" ... " if len(files) > 2 else ", ") + files[-1]
    root = require_root(name, root, layout, download=download)
    base = root / folder
    if download and not all((base / f).is_file() for f in files):
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(spec["url"], download_root=str(root), md5=spec["md5"])
    missing = [f for f in files if not (base / f).is_file()]
    if missing:
        if (root / spec["pickled"]).is_dir():
            raise DataNotFoundError(
                f"{name}: found only the pickled python version at {root / spec['pickled']}, "
                f"which is refused for safety (never unpickle files); use the binary version: "
                f"expected {layout} (from {spec['url']}, or pass --download)"
            )
        raise DataNotFoundError(
            f"{name}: expected {layout}; missing {base / missing[0]} (pass --download to fetch)"
        )
    n_classes = len(spec["classes"])

    def split(names: tuple[str, ...], split_seed: int):
        parts = [read_cifar_bin(base / f, spec["label_bytes"], n_classes) for f in names]
        images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        return uint8_split(images, labels, limit=limit, seed=split_seed, image_size=image_size)

    return Dataset(
        name=name,
        train=split(spec["train"], seed),
        test=split(spec["test"], seed + 1),
        classes=_read_names(base / spec["names_file"], spec["classes"]),
        mean=spec["mean"],
        std=spec["std"],
    )


@DATASETS.register
def cifar10(
    root: Path | None,
    *,
    download: bool = False,
    seed: int = 0,
    image_size: int | None = None,
    limit: int | None = None,
) -> Dataset:
    """CIFAR-10 (50,000/10,000 32x32 RGB) from the official binary files."""
    return _load_cifar("cifar10", root, download, seed, image_size, limit)


@DATASETS.register
def cifar100(
    root: Path | None,
    *,
    download: bool = False,
    seed: int = 0,
    image_size: int | None = None,
    limit: int | None = None,
) -> Dataset:
    """CIFAR-100 (50,000/10,000 32x32 RGB, 100 fine labels) from the official binary files."""
    return _load_cifar("cifar100", root, download, seed, image_size, limit)
