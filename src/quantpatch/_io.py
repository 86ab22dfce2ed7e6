"""Atomic file writes, safetensors with JSON metadata, and content-addressed keys.

Every artifact is written to a temporary file in the same folder and then renamed, so an
interrupted run never leaves a half-written file that a rerun would trust."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from quantpatch.errors import CorruptFileError, DataNotFoundError

_META_KEY = "quantpatch"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it over ``path`` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(
        path, json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"
    )


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"cannot parse JSON file {path}: {exc}") from None


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
) -> None:
    """Save tensors as safetensors; ``metadata`` (any JSON value) rides in the header."""
    header = {_META_KEY: json.dumps(metadata, sort_keys=True, default=_json_default)}
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=header)


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a file written by ``save_tensors``; never unpickles anything."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"file not found: {path}")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        metadata = json.loads(header.get(_META_KEY, "{}"))
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
        raise CorruptFileError(
            f"cannot read {path}: corrupt or not a safetensors file ({exc})"
        ) from None
    return tensors, metadata


def content_key(parts: Mapping[str, Any]) -> str:
    """A short stable hash of everything that determines an artifact (canonical JSON)."""
    blob = json.dumps(parts, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
