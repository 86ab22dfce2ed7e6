"""The bad-input catalogue: every way we know to hand quantpatch bad input, one row each.

A row is a ``Case``: either CLI arguments (``{tmp}`` stands for the case's folder) or an API
call, an optional ``setup`` that writes the bad files there (small, in the real format), and
what must come out:

* CLI: exit code 2 and exactly one stderr line, ``quantpatch: error: ...`` containing
  ``needle``; no traceback (``main`` runs in-process, so any exception fails the row);
* API: the specific ``QuantpatchError`` subtype ``error``, one line, containing ``needle``;
* both: no file or folder created, nothing half-written (the whole tmp tree, current folder
  included, is compared before and after), and no training or other work started (creating the
  artifact cache raises ``ReachedWork``), which also keeps the table fast.

Append rows to ``CASES``; a row for a check that does not exist yet can be marked
``pytest.mark.xfail(strict=True)``, so it turns into a failure the day the check lands.
"""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from test_data import make_cifar10_root, make_cifar100_root, make_idx_root, make_svhn_root

from quantpatch._io import require_writable_dir, require_writable_file
from quantpatch._yaml import load_yaml_mapping
from quantpatch.cli import main
from quantpatch.data import load_dataset
from quantpatch.errors import (
    ConfigError,
    CorruptFileError,
    DataNotFoundError,
    OutputPathError,
    QuantpatchError,
)


@dataclass(frozen=True)
class Case:
    """One bad input and the refusal it must get (see the module docstring)."""

    id: str
    argv: tuple[str, ...] = ()
    api: Callable[[Path], object] | None = None
    setup: Callable[[Path], object] | None = None
    error: type[QuantpatchError] = QuantpatchError
    needle: str = ""
    marks: tuple = ()


class ReachedWork(Exception):
    """Raised where real work (training, caching) would begin: a bad input got through."""


# --------------------------------------------------------------------------- file writers


def write(relpath: str, content: str | bytes) -> Callable[[Path], None]:
    """A setup writing ``content`` to ``<case folder>/<relpath>``."""

    def setup(root: Path) -> None:
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)

    return setup


def study(text: str | bytes) -> Callable[[Path], None]:
    return write("study.yaml", text)


def idx_root(mutate: Callable[[Path], None] | None = None, gz: bool = False):
    """A tiny MNIST tree under ``data/``, then ``mutate(raw folder)``."""

    def setup(root: Path) -> None:
        make_idx_root(root / "data", "MNIST", gz=gz)
        if mutate:
            mutate(root / "data" / "MNIST" / "raw")

    return setup


def idx_bytes(shape: tuple[int, ...], payload: bytes, ndim: int | None = None) -> bytes:
    ndim = len(shape) if ndim is None else ndim
    return bytes([0, 0, 8, ndim]) + struct.pack(f">{len(shape)}I", *shape) + payload


def replace_file(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda raw: (raw / name).write_bytes(data)


def gz_of(payload: bytes) -> bytes:
    return gzip.compress(payload, mtime=0)


def gz_garbage() -> bytes:
    """A gzip header followed by bytes that are not a deflate stream."""
    return gzip.compress(b"", mtime=0)[:10] + b"\xff" * 64


def gz_bomb() -> bytes:
    """A valid idx header for 12 images, then 64 MiB of zeros (~64 KiB compressed)."""
    header = idx_bytes((12, 28, 28), b"")
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip container
    body = [packer.compress(header)]
    block = bytes(2**20)
    body += [packer.compress(block) for _ in range(64)]
    return b"".join(body) + packer.flush()


def cifar(mutate: Callable[[Path], None], which: str = "cifar10"):
    def setup(root: Path) -> None:
        builder = make_cifar10_root if which == "cifar10" else make_cifar100_root
        builder(root / "data")
        folder = "cifar-10-batches-bin" if which == "cifar10" else "cifar-100-binary"
        mutate(root / "data" / folder)

    return setup


def set_byte(name: str, offset: int, value: int) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        raw = bytearray((folder / name).read_bytes())
        raw[offset] = value
        (folder / name).write_bytes(bytes(raw))

    return mutate


def svhn(mutate: Callable[[Path], None]):
    def setup(root: Path) -> None:
        make_svhn_root(root / "data")
        mutate(root / "data" / "train_32x32.mat")

    return setup


def savemat(variables: dict) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        import scipy.io

        scipy.io.savemat(str(path), variables)

    return mutate


def mat_v73_header(path: Path) -> None:
    """The 128-byte header MATLAB writes before the HDF5 body of a -v7.3 file."""
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5"
    path.write_bytes(text.ljust(116) + bytes(8) + b"\x00\x02IM" + bytes(384) + b"\x89HDF\r\n")


def mat_compressed_bomb(path: Path) -> None:
    """X declared (32, 32, 3, 2) uint8 in its header, but its compressed data element claims
    and inflates to 32 MiB: what ``loadmat`` would allocate without the inflation check."""
    import scipy.io

    X = np.zeros((32, 32, 3, 2), np.uint8)
    scipy.io.savemat(str(path), {"X": X, "y": np.ones((2, 1), np.uint8)}, do_compression=True)
    raw = path.read_bytes()
    mdtype, size = struct.unpack("<II", raw[128:136])
    assert mdtype == 15  # miCOMPRESSED
    inner = bytearray(zlib.decompress(raw[136 : 136 + size]))
    data_tag = inner.index(struct.pack("<II", 2, X.size))  # miUINT8, 6144 bytes
    extra = 32 * 2**20
    inner[4:8] = struct.pack("<I", struct.unpack("<I", inner[4:8])[0] + extra)
    inner[data_tag + 4 : data_tag + 8] = struct.pack("<I", X.size + extra)
    bomb = zlib.compress(bytes(inner) + bytes(extra), 9)
    path.write_bytes(raw[:128] + struct.pack("<II", 15, len(bomb)) + bomb + raw[136 + size :])


def png(width: int, height: int, rows: bytes | None = None) -> bytes:
    """A PNG (8-bit RGB) declaring ``width`` x ``height``; ``rows`` is the raw scanline data
    (default: none, i.e. a header whose pixels are missing, as in a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(rows or b"")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def image_tree(bad_name: str | None = None, bad: bytes = b"", **extra: bytes):
    """``data/{train,val}/a/ok.png`` (4x4) plus one bad file under ``data/train/a/``."""

    def setup(root: Path) -> None:
        good = png(4, 4, b"".join(b"\x00" + bytes(12) for _ in range(4)))
        for split in ("train", "val"):
            write(f"data/{split}/a/ok.png", good)(root)
        if bad_name:
            write(f"data/train/a/{bad_name}", bad)(root)
        for relpath, content in extra.items():
            write(relpath, content)(root)

    return setup


def billion_laughs() -> str:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\nname: *i\n"


def results(text: str | bytes) -> Callable[[Path], None]:
    return write("run/results.json", text)


def loads(name: str, **kwargs) -> Callable[[Path], object]:
    return lambda root: load_dataset(name, root / "data", **kwargs)


def yaml_api(root: Path) -> object:
    return load_yaml_mapping(root / "study.yaml")


# --------------------------------------------------------------------------- the table

OUT = ("--out", "{tmp}/run")
TRAIN = ("train", "--model", "lenet")
DATA = ("--data-root", "{tmp}/data")
REPORT = ("report", "{tmp}/run")
TINY = "models: [lenet]\nprecisions: [fp32]\nattacks: [{name: random}]\nlimit: 64\n"

# fmt: off
CASES: list[Case] = [
    # ---- command line: argparse
    Case("no-command", (), needle="required: command"),
    Case("unknown-command", ("frobnicate",), needle="invalid choice"),
    Case("unknown-option", ("run", "--frobnicate"), needle="unrecognized arguments"),
    Case("missing-required-option", ("train",), needle="--model"),
    Case("option-missing-value", ("train", "--model"), needle="expected one argument"),
    Case("epochs-negative", (*TRAIN, "--epochs", "-5"), needle="--epochs: must be at least 1"),
    Case("epochs-zero", (*TRAIN, "--epochs", "0"), needle="must be at least 1"),
    Case("epochs-not-int", (*TRAIN, "--epochs", "three"), needle="expected an integer"),
    Case("qat-epochs-zero", (*TRAIN, "--qat-epochs", "0"), needle="--qat-epochs"),
    Case("limit-zero", ("run", "--limit", "0", *OUT), needle="--limit"),
    Case("limit-float", ("run", "--limit", "1e3", *OUT), needle="expected an integer"),
    Case("n-eval-negative", ("run", "--n-eval", "-1", *OUT), needle="--n-eval"),
    Case("patch-size-zero", ("run", "--patch-size", "0", *OUT), needle="--patch-size"),
    Case("seed-negative", ("run", "--seed", "-1", *OUT), needle="--seed: must be at least 0"),
    Case("models-empty-list", ("run", "--models", ",", *OUT), needle="comma-separated"),
    Case("attacks-empty-list", ("run", "--attacks", "", *OUT), needle="comma-separated"),
    Case("list-unknown-registry", ("list", "nope"), needle="invalid choice"),
    Case("schema-unknown", ("schema", "nope"), needle="invalid choice"),
    Case("report-missing-run-dir-arg", ("report",), needle="run_dir"),
    # ---- command line: names and values
    Case("unknown-model", ("run", "--models", "nope", *OUT), needle="unknown model 'nope'"),
    Case("precision-w0a0", ("run", "--precisions", "w0a0", *OUT), needle="w0a0"),
    Case("precision-w33a8", ("run", "--precisions", "w33a8", *OUT), needle="w33a8"),
    Case("precision-garbage", ("run", "--precisions", "int4", *OUT), needle="int4"),
    Case("unknown-attack", ("run", "--attacks", "nope", *OUT), needle="unknown attack"),
    Case("unknown-dataset", ("run", "--dataset", "nope", *OUT), needle="unknown dataset"),
    Case("patch-larger-than-image", ("run", "--patch-size", "29", *OUT), needle="larger than"),
    Case("invalid-device", ("run", "--device", "tpu9", *OUT), needle="tpu9"),
    Case("train-unknown-model", ("train", "--model", "nope"), needle="unknown model"),
    Case("train-bad-precision", (*TRAIN, "--precision", "w9a9"), needle="w9a9"),
    Case("missing-study-file", ("run", "{tmp}/missing.yaml", *OUT), needle="not found"),
    Case("dataset-needs-root", ("run", "--dataset", "mnist", *OUT), needle="--data-root"),
    Case("data-root-missing", ("run", "--dataset", "cifar10", *DATA, *OUT),
         needle="does not exist"),
    Case("data-root-is-a-file", ("run", "--dataset", "svhn", *DATA, *OUT),
         setup=write("data", "x"), needle="not a directory"),
    # ---- data files: MNIST idx (API: the exact exception type)
    Case("idx-gz-garbage-after-header", api=loads("mnist"), error=CorruptFileError,
         setup=idx_root(replace_file("train-images-idx3-ubyte.gz", gz_garbage()), gz=True),
         needle="train-images-idx3-ubyte.gz"),
    Case("idx-gz-bomb", api=loads("mnist"), error=CorruptFileError,
         setup=idx_root(replace_file("train-images-idx3-ubyte.gz", gz_bomb()), gz=True),
         needle="has data after the 9408 bytes"),
    Case("idx-gz-truncated", api=loads("mnist"), error=CorruptFileError,
         setup=idx_root(replace_file("t10k-labels-idx1-ubyte.gz",
                                     gz_of(idx_bytes((6,), bytes(6)))[:-12]), gz=True),
         needle="t10k-labels-idx1-ubyte.gz: Compressed file ended"),
    Case("idx-truncated", api=loads("mnist"), error=CorruptFileError,
         setup=idx_root(replace_file("train-images-idx3-ubyte",
                                     idx_bytes((12, 28, 28), bytes(100)))),
         needle="truncated"),
    Case("idx-trailing-bytes", api=loads("mnist"), error=CorruptFileError,
         setup=idx_root(replace_file("train-labels-idx1-ubyte", idx_bytes((12,), bytes(13)))),
         needle="has data after"),
    Case("idx-absurd-header", api=loads("mnist"), error=CorruptFileError,
         setup=idx_root(replace_file("train-images-idx3-ubyte",
                                     idx_bytes((2**32 - 1, 28, 28), bytes(10)))),
         needle="GiB limit"),
    Case("idx-bad-magic", api=loads("mnist"), error=CorruptFileError,
         setup=idx_root(replace_file("t10k-images-idx3-ubyte", b"\x1f\x8b\x08\x00" + bytes(20))),
         needle="not an idx3-ubyte file"),
    Case("idx-short-header", api=loads("mnist"), error=CorruptFileError,
         setup=idx_root(replace_file("t10k-images-idx3-ubyte", bytes([0, 0, 8, 3, 0]))),
         needle="truncated idx header"),
    Case("idx-wrong-image-size", api=loads("mnist"), error=CorruptFileError,
         setup=idx_root(replace_file("train-images-idx3-ubyte",
                                     idx_bytes((12, 32, 32), bytes(12 * 32 * 32)))),
         needle="items are 32x32, expected 28x28"),
    Case("idx-zero-items", api=loads("fashion-mnist"), error=CorruptFileError,
         setup=lambda r: make_idx_root(r / "data", "FashionMNIST", n_test=0),
         needle="holds no items"),
    Case("idx-count-mismatch", api=loads("mnist"), error=CorruptFileError,
         setup=idx_root(replace_file("train-labels-idx1-ubyte", idx_bytes((3,), bytes(3)))),
         needle="12 images but"),
    Case("idx-label-out-of-range", api=loads("mnist"), error=CorruptFileError,
         setup=idx_root(replace_file("train-labels-idx1-ubyte", idx_bytes((12,), b"\x0a" * 12))),
         needle="train-labels-idx1-ubyte: label 10 out of range"),
    Case("idx-missing-file", api=loads("mnist"), error=DataNotFoundError,
         setup=idx_root(lambda raw: (raw / "t10k-labels-idx1-ubyte").unlink()),
         needle="t10k-labels-idx1-ubyte"),
    Case("idx-gz-bomb-via-cli", (*TRAIN, "--dataset", "mnist", *DATA),
         setup=idx_root(replace_file("train-images-idx3-ubyte.gz", gz_bomb()), gz=True),
         needle="has data after"),
    # ---- data files: CIFAR binary
    Case("cifar-truncated-record", api=loads("cifar10"), error=CorruptFileError,
         setup=cifar(lambda f: (f / "data_batch_2.bin").write_bytes(bytes(3073 * 2 - 7))),
         needle="data_batch_2.bin"),
    Case("cifar-empty-file", api=loads("cifar10"), error=CorruptFileError,
         setup=cifar(lambda f: (f / "test_batch.bin").write_bytes(b"")),
         needle="test_batch.bin: 0 bytes"),
    Case("cifar-label-out-of-range", api=loads("cifar10"), error=CorruptFileError,
         setup=cifar(set_byte("data_batch_5.bin", 0, 10)), needle="label 10 out of range"),
    Case("cifar100-fine-label-out-of-range", api=loads("cifar100"), error=CorruptFileError,
         setup=cifar(set_byte("train.bin", 1, 100), "cifar100"), needle="label 100"),
    Case("cifar100-coarse-label-out-of-range", api=loads("cifar100"), error=CorruptFileError,
         setup=cifar(set_byte("test.bin", 0, 20), "cifar100"), needle="coarse label 20"),
    Case("cifar-names-not-utf8", api=loads("cifar10"), error=CorruptFileError,
         setup=cifar(lambda f: (f / "batches.meta.txt").write_bytes(b"avi\xf3n\n" * 10)),
         needle="batches.meta.txt"),
    Case("cifar-names-wrong-count", api=loads("cifar10"), error=CorruptFileError,
         setup=cifar(lambda f: (f / "batches.meta.txt").write_text("cat\ndog\n")),
         needle="2 class names, expected 10"),
    Case("cifar-names-repeat", api=loads("cifar10"), error=CorruptFileError,
         setup=cifar(lambda f: (f / "batches.meta.txt").write_text("cat\n" * 10)),
         needle="class names repeat"),
    Case("cifar-names-huge", api=loads("cifar10"), error=CorruptFileError,
         setup=cifar(lambda f: (f / "batches.meta.txt").write_bytes(b"x" * 70_000)),
         needle="larger than 64 KiB"),
    Case("cifar-pickled-only", api=loads("cifar10"), error=DataNotFoundError,
         setup=write("data/cifar-10-batches-py/data_batch_1", b"\x80\x04N."),
         needle="refused for safety"),
    Case("cifar-truncated-via-cli", ("run", "--dataset", "cifar10", *DATA, *OUT),
         setup=cifar(lambda f: (f / "data_batch_1.bin").write_bytes(bytes(100))),
         needle="data_batch_1.bin"),
    # ---- data files: SVHN .mat
    Case("svhn-garbage", api=loads("svhn"), error=CorruptFileError,
         setup=svhn(lambda p: p.write_bytes(b"not a mat file" * 20)), needle="train_32x32.mat"),
    Case("svhn-matlab-v73", api=loads("svhn"), error=CorruptFileError,
         setup=svhn(mat_v73_header), needle="v7.3"),
    Case("svhn-truncated", api=loads("svhn"), error=CorruptFileError,
         setup=svhn(lambda p: p.write_bytes(p.read_bytes()[:3000])), needle="train_32x32"),
    Case("svhn-wrong-image-shape", api=loads("svhn"), error=CorruptFileError,
         setup=svhn(savemat({"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.ones((2, 1))})),
         needle="expected (32, 32, 3, N)"),
    Case("svhn-label-count-mismatch", api=loads("svhn"), error=CorruptFileError,
         setup=svhn(savemat({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((3, 1))})),
         needle="2 images but y is (3, 1)"),
    Case("svhn-zero-images", api=loads("svhn"), error=CorruptFileError,
         setup=svhn(savemat({"X": np.zeros((32, 32, 3, 0), np.uint8), "y": np.ones((0, 1))})),
         needle="X has shape"),
    Case("svhn-images-not-numbers", api=loads("svhn"), error=CorruptFileError,
         setup=svhn(savemat({"X": np.zeros((32, 32, 3, 1), object), "y": np.ones((1, 1))})),
         needle="X is a MATLAB cell"),
    Case("svhn-missing-variables", api=loads("svhn"), error=CorruptFileError,
         setup=svhn(savemat({"images": np.zeros((2, 2))})), needle="lacks the X and y"),
    Case("svhn-label-out-of-range", api=loads("svhn"), error=CorruptFileError,
         setup=svhn(savemat({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.full((2, 1), 11)})),
         needle="labels outside 0..10"),
    Case("svhn-compressed-bomb", api=loads("svhn"), error=CorruptFileError,
         setup=svhn(mat_compressed_bomb), needle="expands beyond"),
    # ---- data files: ImageFolder
    Case("image-decompression-bomb-30000px", api=loads("imagefolder", image_size=8),
         error=CorruptFileError, setup=image_tree("huge.png", png(30_000, 30_000)),
         needle="huge.png"),
    Case("image-above-pixel-limit", api=loads("imagefolder", image_size=8),
         error=CorruptFileError, setup=image_tree("big.png", png(9_000, 9_000)),
         needle="big.png is 9000x9000 pixels, more than the 64 megapixel limit"),
    Case("image-extreme-aspect", api=loads("imagefolder", image_size=8), error=CorruptFileError,
         setup=image_tree("thin.png", png(65, 1, b"\x00" + bytes(195))),
         needle="thin.png is 65x1 pixels, sides more than 64:1 apart"),
    Case("image-not-an-image", api=loads("imagefolder", image_size=8), error=CorruptFileError,
         setup=image_tree("notes.jpg", b"these are my notes, not a JPEG\n"),
         needle="notes.jpg"),
    Case("image-truncated-pixels", api=loads("imagefolder", image_size=8),
         error=CorruptFileError, setup=image_tree("cut.png", png(64, 64)),
         needle="cannot decode"),
    Case("image-split-too-big-for-memory", api=loads("imagefolder", image_size=30_000),
         error=ConfigError, setup=image_tree(), needle="--limit"),
    Case("image-val-missing", api=loads("imagefolder"), error=DataNotFoundError,
         setup=write("data/train/a/x.png", png(4, 4, bytes(52))), needle="val"),
    Case("image-val-unknown-class", api=loads("imagefolder", image_size=8),
         error=DataNotFoundError, setup=image_tree(**{"data/val/zebra/z.png": png(1, 1, bytes(4))}),
         needle="zebra"),
    Case("image-bomb-via-cli", (*TRAIN, "--dataset", "imagefolder", *DATA),
         setup=image_tree("huge.png", png(30_000, 30_000)), needle="huge.png"),
    # ---- study files, at the loader (API)
    Case("yaml-not-utf8", api=yaml_api, error=ConfigError,
         setup=study("name: caf\xe9\n".encode("latin-1")), needle="not UTF-8 text (byte 0xe9"),
    Case("yaml-utf16", api=yaml_api, error=ConfigError,
         setup=study("name: x\n".encode("utf-16")), needle="not UTF-8"),
    Case("yaml-empty", api=yaml_api, error=ConfigError, setup=study(""), needle="empty"),
    Case("yaml-only-comments", api=yaml_api, error=ConfigError,
         setup=study("# models: [lenet]\n\n"), needle="empty"),
    Case("yaml-top-level-list", api=yaml_api, error=ConfigError,
         setup=study("- lenet\n- resnet20\n"), needle="not a list"),
    Case("yaml-top-level-scalar", api=yaml_api, error=ConfigError,
         setup=study("lenet\n"), needle="not a single value"),
    Case("yaml-duplicate-key", api=yaml_api, error=ConfigError,
         setup=study("models: [lenet]\nseeds: [0]\nmodels: [resnet20]\n"),
         needle="line 3: duplicate key 'models' (first at line 1)"),
    Case("yaml-duplicate-nested-key", api=yaml_api, error=ConfigError,
         setup=study("train:\n  epochs: 3\n  lr: 0.1\n  epochs: 30\n"),
         needle="duplicate key 'epochs'"),
    Case("yaml-duplicate-key-in-list-item", api=yaml_api, error=ConfigError,
         setup=study("attacks:\n  - {name: universal, name: random}\n"),
         needle="duplicate key 'name'"),
    Case("yaml-alias-bomb", api=yaml_api, error=ConfigError, setup=study(billion_laughs()),
         needle="more than 100000 values"),
    Case("yaml-recursive-alias", api=yaml_api, error=ConfigError,
         setup=study("models: &m [lenet, *m]\n"), needle="refers to its own anchor"),
    Case("yaml-syntax-error", api=yaml_api, error=ConfigError,
         setup=study("models: [lenet, resnet20\nseeds: [0]\n"), needle="invalid YAML at line"),
    Case("yaml-tab-indent", api=yaml_api, error=ConfigError,
         setup=study("train:\n\tepochs: 3\n"), needle="line 2"),
    Case("yaml-two-documents", api=yaml_api, error=ConfigError,
         setup=study("name: a\n---\nname: b\n"), needle="single document"),
    Case("yaml-python-tag", api=yaml_api, error=ConfigError,
         setup=study("name: !!python/object/apply:os.system [echo pwned]\n"),
         needle="could not determine a constructor"),
    Case("yaml-control-character", api=yaml_api, error=ConfigError,
         setup=study("name: a\x00b\n"), needle="unacceptable character"),
    Case("yaml-deep-nesting", api=yaml_api, error=ConfigError,
         setup=study("name: " + "[" * 5000 + "]" * 5000 + "\n"), needle="levels deep"),
    Case("yaml-too-large", api=yaml_api, error=ConfigError,
         setup=study("name: x\n" + "# padding\n" * 30_000), needle="larger than 256 KiB"),
    Case("yaml-non-text-key", api=yaml_api, error=ConfigError,
         setup=study("1: lenet\n"), needle="setting names must be text"),
    Case("yaml-is-a-folder", api=yaml_api, error=ConfigError,
         setup=lambda r: (r / "study.yaml").mkdir(), needle="is a folder"),
    Case("yaml-missing", api=yaml_api, error=DataNotFoundError, needle="not found"),
    # ---- study files through `quantpatch run` (validated by the study config)
    Case("study-top-level-list", ("run", "{tmp}/study.yaml", *OUT),
         setup=study("- lenet\n"), needle="mapping"),
    Case("study-syntax-error", ("run", "{tmp}/study.yaml", *OUT),
         setup=study("models: [lenet\n"), needle="YAML"),
    Case("study-unknown-field", ("run", "{tmp}/study.yaml", *OUT),
         setup=study("modelz: [lenet]\n"), needle="modelz"),
    Case("study-wrong-type", ("run", "{tmp}/study.yaml", *OUT),
         setup=study("models: 3\n"), needle="models"),
    Case("study-negative-limit", ("run", "{tmp}/study.yaml", *OUT),
         setup=study("limit: -1\n"), needle="limit"),
    Case("study-zero-patch", ("run", "{tmp}/study.yaml", *OUT),
         setup=study("patch_sizes: [0]\n"), needle="patch"),
    Case("study-negative-epochs", ("run", "{tmp}/study.yaml", *OUT),
         setup=study("train: {epochs: -1}\n"), needle="epochs"),
    Case("study-unknown-tv-model", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY.replace("[lenet]", "[tv:nopenet]")), needle="nopenet"),
    Case("study-unknown-calibration", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY + "calibration: magic\n"), needle="calibration"),
    Case("study-qat-override-typo", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY + "qat_overrides: {w4a4: {epochs: 2}}\n"), needle="qat_overrides"),
    Case("study-train-override-typo", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY + "train_overrides: {lenett: {epochs: 2}}\n"),
         needle="train_overrides"),
    Case("study-analyses-model-typo", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY + "analyses: {models: [resnet]}\n"), needle="analyses.models"),
    Case("study-n-eval-beyond-test-set", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY + "n_eval: 100000\n"), needle="n_eval"),
    Case("study-target-class-out-of-range", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY.replace("{name: random}", "{name: universal, params: "
                                  "{targeted: true, target_class: 10}}")),
         needle="target_class 10"),
    Case("study-targeted-without-class", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY.replace("{name: random}", "{name: universal, params: "
                                  "{targeted: true}}")), needle="target_class"),
    Case("study-negative-steps", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY.replace("{name: random}", "{name: patch-pgd, params: {steps: -3}}")),
         needle="steps"),
    Case("study-bad-lavan-mode", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY.replace("{name: random}", "{name: lavan, params: {mode: sideways}}")),
         needle="mode"),
    Case("study-bad-eps", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY.replace("{name: random}", "{name: pgd-linf, params: {eps: -0.1}}")),
         needle="eps"),
    Case("study-identical-attacks", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY.replace("[{name: random}]", "[{name: random}, {name: random}]")),
         needle="listed twice"),
    Case("study-onnx-mean-nan", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY + "onnx_models: [{name: u, path: u.onnx, mean: [.nan], std: [1]}]\n"),
         needle="finite number"),
    Case("study-onnx-std-inf", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY + "onnx_models: [{name: u, path: u.onnx, mean: [0], std: [.inf]}]\n"),
         needle="finite number"),
    Case("study-patchcleanser-too-many-masks", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY + "patch_sizes: [7]\ndefenses: [{name: patchcleanser, params: "
                     "{patch_size: 7, masks_per_axis: 100}}]\n"), needle="22 positions"),
    Case("study-attack-eps-nan", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY.replace("{name: random}", "{name: pgd-linf, params: {eps: .nan}}")),
         needle="eps"),
    Case("study-defense-param-inf", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY + "defenses: [{name: gaussian-blur, params: {sigma: .inf}}]\n"),
         needle="sigma"),
    Case("study-learning-rate-inf", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY + "train: {lr: .inf}\n"), needle="finite number"),
    Case("study-unavailable-device", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY + "device: cuda:3\n"), needle="cuda"),
    Case("study-unknown-attack-param", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY.replace("{name: random}", "{name: universal, params: {stepz: 3}}")),
         needle="stepz"),
    Case("study-cache-dir-under-a-file",
         ("run", "{tmp}/study.yaml", *OUT, "--cache-dir", "{tmp}/study.yaml/cache"),
         setup=study(TINY), needle="cache folder"),
    Case("study-file-cache-dir-absolute", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY + "cache_dir: /tmp/elsewhere\n"), needle="relative path"),
    Case("study-file-cache-dir-escapes", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY + "cache_dir: ../../elsewhere\n"), needle="relative path"),
    # ---- study files: study-level validation
    Case("study-empty-file", ("run", "{tmp}/study.yaml", *OUT), setup=study(""),
         needle="empty"),
    Case("study-duplicate-key", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY + "models: [resnet20]\n"), needle="duplicate key"),
    Case("study-not-utf8", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY.encode() + b"name: caf\xe9\n"), needle="UTF-8"),
    Case("study-duplicate-seeds", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY + "seeds: [0, 0]\n"), needle="seeds"),
    Case("study-negative-seed", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY + "seeds: [-1]\n"), needle="seed"),
    Case("study-no-attacks", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY.replace("attacks: [{name: random}]", "attacks: []")),
         needle="attacks"),
    Case("study-duplicate-models", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY.replace("[lenet]", "[lenet, lenet]")), needle="models"),
    Case("study-duplicate-patch-sizes", ("run", "{tmp}/study.yaml", *OUT),
         setup=study(TINY + "patch_sizes: [7, 7]\n"), needle="patch"),
    Case("study-name-path-traversal", ("run", "{tmp}/study.yaml"),
         setup=study(TINY + "name: ../../escaped\n"), needle="name"),
    Case("study-empty-name", ("run", "{tmp}/study.yaml"),
         setup=study(TINY + "name: ''\n"), needle="name"),
    # ---- outputs: refused before any work
    Case("train-out-in-proc", (*TRAIN, "--out", "/proc/quantpatch.safetensors"),
         needle="/proc is a kernel pseudo-filesystem"),
    Case("train-out-is-a-folder", (*TRAIN, "--out", "{tmp}"), needle="is a folder"),
    Case("train-out-is-a-device", (*TRAIN, "--out", "/dev/null"), needle="not a regular file"),
    Case("train-out-under-a-file", (*TRAIN, "--out", "{tmp}/f/model.safetensors"),
         setup=write("f", "x"), needle="f is not a folder"),
    Case("train-cache-dir-in-sys", (*TRAIN, "--cache-dir", "/sys/quantpatch"), needle="/sys"),
    Case("train-cache-dir-is-a-file", (*TRAIN, "--cache-dir", "{tmp}/f"), setup=write("f", "x"),
         needle="cache folder"),
    Case("run-out-in-proc", ("run", "--out", "/proc/quantpatch-run"), needle="run folder"),
    Case("run-out-is-a-file", ("run", *OUT), setup=write("run", "x"), needle="not a folder"),
    Case("run-cache-dir-in-sys", ("run", *OUT, "--cache-dir", "/sys/x"), needle="/sys"),
    Case("report-out-in-proc", (*REPORT, "--out", "/proc/report.html"), needle="report file"),
    Case("api-output-folder-in-sys", api=lambda r: require_writable_dir("/sys/x", "run folder"),
         error=OutputPathError, needle="run folder /sys/x: /sys is a kernel pseudo-filesystem"),
    Case("api-output-file-is-a-folder", api=lambda r: require_writable_file(r, "report file"),
         error=OutputPathError, needle="is a folder, not a file name"),
    Case("report-out-is-a-folder", (*REPORT, "--out", "{tmp}"), needle="is a folder"),
    Case("report-run-dir-missing", REPORT, needle="not found"),
    Case("report-run-dir-is-a-file", REPORT, setup=write("run", "x"), needle="not found"),
    Case("report-results-garbage", REPORT, setup=results(b"\x00\x01garbage"),
         needle="results.json"),
    Case("report-results-not-utf8", REPORT, setup=results(b'{"study": "caf\xe9"}'),
         needle="results.json"),
    Case("report-results-deeply-nested", REPORT, setup=results("[" * 100_000 + "]" * 100_000),
         needle="nested too deeply"),
    Case("report-results-wrong-version", REPORT, setup=results('{"format_version": 999}'),
         needle="results format 999"),
    Case("report-results-not-an-object", REPORT, setup=results("[1, 2, 3]"),
         needle="results.json"),
]
# fmt: on


# --------------------------------------------------------------------------- the test


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def case_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The case folder; the current folder is a fresh ``cwd/`` beside it (default outputs land
    inside tmp_path), and creating the artifact cache raises ``ReachedWork``."""
    from quantpatch.study.store import cache

    def reached_work(self, root):
        raise ReachedWork(f"work started (artifact cache {root}): the bad input got through")

    monkeypatch.setattr(cache.ArtifactCache, "__init__", reached_work)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    (tmp_path / "case").mkdir()
    return tmp_path / "case"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_refused_cleanly(case: Case, case_dir: Path, capsys) -> None:
    if case.setup:
        case.setup(case_dir)
    top = case_dir.parent
    before = _tree(top)
    if case.api is not None:
        with pytest.raises(case.error) as info:
            case.api(case_dir)
        line = f"quantpatch: error: {info.value}"
        assert isinstance(info.value, QuantpatchError)
    else:
        code = main([arg.replace("{tmp}", str(case_dir)) for arg in case.argv])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "Traceback" not in err
        line = err.rstrip("\n")
    assert len(line.splitlines()) == 1, line
    assert line.startswith("quantpatch: error: ")
    assert case.needle in line
    assert _tree(top) == before  # nothing written, nothing half-written


def test_case_ids_are_unique_and_the_table_is_large() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert sum(not c.marks for c in CASES) >= 40
    assert not [c.id for c in CASES if c.api is not None and c.argv]  # one way in per row


@pytest.mark.parametrize(
    "argv",
    [["train", "--model", "lenet", "--epochs", "-5"], ["run", "--frobnicate"]],
    ids=["negative-epochs", "unknown-option"],
)
def test_the_real_entry_point_prints_one_line(argv: list[str], tmp_path: Path) -> None:
    """Through ``python -m quantpatch.cli``: what a user's shell sees."""
    done = subprocess.run(
        [sys.executable, "-m", "quantpatch.cli", *argv],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("quantpatch: error: "), done.stderr
    assert "--help" in lines[0]
    assert list(tmp_path.iterdir()) == []
