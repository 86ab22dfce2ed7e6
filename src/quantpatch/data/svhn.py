"""``svhn``: cropped digits from ``<root>/train_32x32.mat`` and ``<root>/test_32x32.mat``.

Read with ``scipy.io.loadmat`` (MATLAB v5 format, no unpickling) exactly as
``torchvision.datasets.SVHN`` does, minus its MD5 check (so re-packed files also load); label
10 means digit 0.

A ``.mat`` file is untrusted input, and ``loadmat`` allocates whatever its headers claim and
inflates compressed variables without a cap. So before it runs, the variable headers are read
with ``whosmat`` (which decodes no data) and checked, and each compressed ``X``/``y`` is inflated
once as a stream and refused as soon as it expands beyond the size its header declares: a
decompression bomb costs one bounded pass, never gigabytes of memory.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np

from quantpatch.data._common import MAX_SPLIT_BYTES, require_root, uint8_split
from quantpatch.data._registry import DATASETS
from quantpatch.data._types import Dataset
from quantpatch.errors import CorruptFileError, DataNotFoundError

SVHN_LAYOUT = "<root>/train_32x32.mat and <root>/test_32x32.mat (SVHN format 2, MATLAB v5)"

_ITEMSIZE = {"int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4,
             "int64": 8, "uint64": 8, "single": 4, "double": 8, "logical": 1}  # fmt: skip
_MI_COMPRESSED = 15
_HEADER_SLACK = 1024  # array flags, dims and name stored around a variable's data
_CHUNK = 2**20


def _scipy_io():
    try:
        import scipy.io as sio
    except ImportError as exc:
        raise DataNotFoundError("svhn: reading .mat files needs scipy (pip install scipy)") from exc
    return sio


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, 32, 32) uint8 images and (N,) labels in 0..9 from an SVHN ``.mat`` file."""
    sio = _scipy_io()
    _check_mat_headers(sio, path)
    try:
        mat = sio.loadmat(str(path), variable_names=["X", "y"])
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for bad files
        raise CorruptFileError(f"svhn: cannot read {path}: {exc}") from None
    X, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    if X.shape[:3] != (32, 32, 3) or X.ndim != 4 or y.shape[0] != X.shape[3]:
        raise CorruptFileError(f"svhn: {path} X {X.shape} and y {y.shape} do not match")
    if y.min() < 0 or y.max() > 10:
        raise CorruptFileError(f"svhn: {path} labels outside 0..10")
    y[y == 10] = 0  # SVHN stores digit 0 as label 10
    if X.dtype != np.uint8:
        if X.min() < 0 or X.max() > 255:
            raise CorruptFileError(f"svhn: {path} pixels outside 0..255")
        X = X.astype(np.uint8)
    return np.transpose(X, (3, 2, 0, 1)), y  # (H, W, C, N) -> (N, C, H, W), as torchvision


def _check_mat_headers(sio, path: Path) -> None:
    """Refuse, from headers alone, a file that is not an SVHN v5 ``.mat`` of sane size."""
    try:
        if path.stat().st_size > MAX_SPLIT_BYTES:
            raise CorruptFileError(f"svhn: {path} is larger than {MAX_SPLIT_BYTES >> 30} GiB")
        with path.open("rb") as f:
            major, _ = sio.matlab.matfile_version(f)
        if major == 2:
            raise CorruptFileError(
                f"svhn: {path} is a MATLAB v7.3 (HDF5) file; expected v5 (save with -v7)"
            )
        variables = sio.whosmat(str(path))
    except CorruptFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for bad files
        raise CorruptFileError(f"svhn: cannot read {path}: {exc}") from None
    declared = {name: (tuple(shape), kind) for name, shape, kind in variables}
    if "X" not in declared or "y" not in declared:
        raise CorruptFileError(f"svhn: {path} lacks the X and y variables")
    (x_shape, _), (y_shape, _) = declared["X"], declared["y"]
    if len(x_shape) != 4 or x_shape[:3] != (32, 32, 3) or x_shape[3] == 0:
        raise CorruptFileError(f"svhn: {path} X has shape {x_shape}, expected (32, 32, 3, N)")
    if len(y_shape) > 2 or math.prod(y_shape) != x_shape[3]:
        raise CorruptFileError(f"svhn: {path} has {x_shape[3]} images but y is {y_shape}")
    limits = {}
    for name, (shape, kind) in declared.items():
        if name in ("X", "y"):
            if kind not in _ITEMSIZE:
                raise CorruptFileError(f"svhn: {path} {name} is a MATLAB {kind}, not numbers")
            limits[name] = math.prod(shape) * _ITEMSIZE[kind] + _HEADER_SLACK
    if limits["X"] > MAX_SPLIT_BYTES:
        raise CorruptFileError(f"svhn: {path} X claims more than {MAX_SPLIT_BYTES >> 30} GiB")
    if major == 1:  # v5 may compress variables; v4 never does
        _check_inflated_sizes(path, [limits.get(name) for name, _, _ in variables])


def _check_inflated_sizes(path: Path, limits: list[int | None]) -> None:
    """Walk the v5 top-level elements (one per variable, in ``whosmat`` order) and inflate each
    compressed one that has a limit, refusing it once it expands beyond that limit."""
    try:
        with path.open("rb") as f:
            order = "<" if f.read(128)[126:128] == b"IM" else ">"
            for limit in limits:
                mdtype, nbytes = struct.unpack(order + "II", f.read(8))
                end = f.tell() + nbytes
                compressed = mdtype == _MI_COMPRESSED and limit is not None
                if compressed and _inflated_size(f, nbytes, limit) > limit:
                    raise CorruptFileError(
                        f"svhn: {path}: a compressed variable expands beyond the "
                        f"{limit} bytes its header declares"
                    )
                f.seek(end)
    except (OSError, struct.error, zlib.error) as exc:
        raise CorruptFileError(f"svhn: cannot read {path}: {exc}") from None


def _inflated_size(f, nbytes: int, cap: int) -> int:
    """Bytes the zlib stream of ``nbytes`` at ``f`` inflates to, counting no further than
    ``cap`` + 1 and holding at most one chunk in memory."""
    inflater = zlib.decompressobj()
    total, pending, left = 0, b"", nbytes
    while total <= cap:
        if not pending:
            if not left or inflater.eof:
                break
            pending = f.read(min(_CHUNK, left))
            left -= len(pending)
            if not pending:
                break
        total += len(inflater.decompress(pending, _CHUNK))
        pending = inflater.unconsumed_tail
    return total


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
        images, labels = read_svhn_mat(path)
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
