"""Atomic file writes, output-path checks, safetensors with JSON metadata, content keys.

Every artifact is written to a temporary file in the same folder and then renamed, so an
interrupted run never leaves a half-written file that a rerun would trust. Output paths are
checked before any work (``require_writable_dir``/``require_writable_file``), so a bad path
fails in a second instead of after an hour of training."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantpatch.errors import CorruptFileError, DataNotFoundError, OutputPathError

if TYPE_CHECKING:  # torch is imported where tensors are: `quantpatch --help` stays fast
    import torch

_META_KEY = "quantpatch"
MAX_JSON_BYTES = 256 * 2**20
"""Largest JSON file ``read_json`` accepts; a big study's results.json is a few MB."""
_PSEUDO_FILESYSTEMS = (Path("/proc"), Path("/sys"))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it over ``path`` only if the block succeeds.

    The temp file is created like ``open(path, "x")`` (mode 0666 minus the umask), so outputs
    get the same permissions as any other file the user writes; ``mkstemp`` would make them
    0600 whatever the umask."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = final.with_name(f".{final.name}.{secrets.token_hex(8)}.tmp")
    tmp_path.touch(mode=0o666, exist_ok=False)  # O_EXCL: never clobbers anything
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


def require_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Check, before any work, that ``path`` is or can become a writable folder.

    Refuses an existing non-folder, anything under /proc or /sys, and a folder whose nearest
    existing ancestor does not accept a new file (probed by creating and removing a temp file:
    permission bits do not tell for root, read-only mounts or ACLs). Creates nothing. Raises
    ``OutputPathError`` ("<what> <path>: <problem>")."""
    folder = Path(path).expanduser()
    problem = _folder_problem(folder)
    if problem:
        raise OutputPathError(f"{what} {folder}: {problem}")
    return folder


def require_writable_file(path: str | os.PathLike, what: str) -> Path:
    """Check, before any work, that ``path`` can be (re)written atomically: not a folder or a
    device, and its folder passes ``require_writable_dir``. Raises ``OutputPathError``."""
    file = Path(path).expanduser()
    try:
        if file.is_dir():
            problem = "is a folder, not a file name"
        elif file.exists() and not file.is_file():
            problem = "exists and is not a regular file"
        else:
            problem = _folder_problem(file.parent)
    except (OSError, ValueError) as exc:
        problem = _reason(exc)
    if problem:
        raise OutputPathError(f"{what} {file}: {problem}")
    return file


def _folder_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be used as an output folder, or ``None`` when it can."""
    try:
        resolved = folder.resolve()
        existing = resolved
        while not existing.exists():  # ends at "/" at the latest
            existing = existing.parent
        is_dir = existing.is_dir()
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        return f"unusable path ({_reason(exc)})"
    for pseudo in _PSEUDO_FILESYSTEMS:
        if resolved.is_relative_to(pseudo):
            return f"{pseudo} is a kernel pseudo-filesystem, not a place for files"
    if not is_dir:
        return f"{existing} is not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".quantpatch-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot create files in {existing} ({_reason(exc)})"
    return None


def _reason(exc: Exception) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(
        path, json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"
    )


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file of at most ``MAX_JSON_BYTES``; any decode failure is a
    ``CorruptFileError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"file not found: {path}")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise CorruptFileError(f"{path}: larger than {MAX_JSON_BYTES >> 20} MiB of JSON")
        return json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"cannot parse JSON file {path}: {exc}") from None
    except RecursionError:
        raise CorruptFileError(f"cannot parse JSON file {path}: nested too deeply") from None
    except OSError as exc:
        raise CorruptFileError(f"cannot read {path}: {_reason(exc)}") from None


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
) -> None:
    """Save tensors as safetensors; ``metadata`` (any JSON value) rides in the header."""
    from safetensors.torch import save_file

    header = {_META_KEY: json.dumps(metadata, sort_keys=True, default=_json_default)}
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=header)


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a file written by ``save_tensors``; never unpickles anything."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"file not found: {path}")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        metadata = json.loads(header.get(_META_KEY, "{}"))
    except (SafetensorError, OSError, ValueError, RecursionError) as exc:
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
    torch_module = sys.modules.get("torch")  # a tensor exists only once torch is imported
    if torch_module is not None and isinstance(obj, torch_module.Tensor):
        return obj.tolist()
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
