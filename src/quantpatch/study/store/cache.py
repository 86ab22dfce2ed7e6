"""The content-addressed artifact cache: trained and quantized models, ONNX files, patches.

A key hashes everything that determines an artifact: its settings, the cache format and a
fingerprint of the code that makes it, so an identical request reuses the file and any
changed setting or code produces a new one. Each entry is written atomically and sealed with
a checksum; a damaged entry (truncated, edited, unreadable) is reported in one line and
rebuilt. A lock per entry lets concurrent runs share work: the second waits for the first and
then reads its file instead of building it again."""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock
from pydantic import BaseModel, ValidationError

from quantpatch._io import content_key, read_json, write_json_atomic, write_text_atomic
from quantpatch.errors import CorruptFileError, QuantpatchError

T = TypeVar("T")
R = TypeVar("R", bound=BaseModel)

CACHE_FORMAT = 2
"""Part of every cache key and seal: bump it when a cached artifact's meaning changes."""

MODEL_CODE = ("data", "models", "quant", "_io.py", "study/zoo/models.py")
"""The source a trained or quantized model depends on. Deployments and their checks are not
part of it: editing a runtime never retrains a model."""

DEPLOYMENT_CODE = (*MODEL_CODE, "deployments")
"""What an exported, deployed file depends on: the model's code and the runtimes'."""

RECIPE_CODE = ("defenses", "attacks/placement.py")
"""What a training defence's model depends on beyond ``MODEL_CODE`` (its objective, the patch
paste of patch-at): part of those models' keys only, so plain models survive edits there."""

EVAL_CODE = ("",)
"""Everything else (patches, cells, analyses) may depend on any module: the whole package."""

_CODE_OF = {"models": MODEL_CODE, "deployments": DEPLOYMENT_CODE}

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def code_fingerprint(*paths: str, root: Path = PACKAGE_ROOT) -> str:
    """A hash of quantpatch's source files under ``paths`` (relative to the package ``root``;
    "" is all of it): part of every cache key, so a rerun after a code change recomputes what
    that code produced instead of silently reusing it. The report and CLI, which compute
    nothing that is cached, are left out."""
    digest = hashlib.sha256()
    for rel in sorted(paths):
        target = root / rel
        files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
        for path in files:
            name = path.relative_to(root).as_posix()
            if name.startswith(("report/", "cli/")):
                continue
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def warn(message: str) -> None:
    """One line on stderr for something the run repairs by itself."""
    print(f"quantpatch: warning: {message}", file=sys.stderr, flush=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ArtifactCache:
    """Maps key dicts to sealed files under one root folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, kind: str, parts: dict[str, Any], suffix: str) -> Path:
        code = code_fingerprint(*_CODE_OF.get(kind, EVAL_CODE))
        key = content_key({"format": CACHE_FORMAT, "code": code, "kind": kind, **parts})
        return self.root / kind / f"{key}.{suffix}"

    def get(
        self,
        kind: str,
        parts: dict[str, Any],
        suffix: str,
        *,
        build: Callable[[Path], None],
        load: Callable[[Path], T],
    ) -> T:
        """``load`` the entry, after ``build``-ing it (which writes the file atomically) when
        it is missing or damaged. Concurrent callers build it once."""
        path = self.path(kind, parts, suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(self.root / ".locks" / f"{kind}-{path.name}.lock"):
            if path.exists():
                loaded = self._load_sealed(path, load)
                if loaded is not None:
                    return loaded[0]
            build(path)
            self._seal(path)
        return load(path)

    def _load_sealed(self, path: Path, load: Callable[[Path], T]) -> tuple[T] | None:
        problem = self._seal_problem(path)
        if problem is None:
            try:
                return (load(path),)
            except QuantpatchError as exc:
                problem = str(exc)
        warn(f"damaged cache entry {path} ({problem}); rebuilding it")
        path.unlink(missing_ok=True)
        _seal_path(path).unlink(missing_ok=True)
        return None

    def _seal_problem(self, path: Path) -> str | None:
        seal = _seal_path(path)
        try:
            expected = json.loads(seal.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "no readable checksum"
        if not isinstance(expected, dict) or expected.get("format") != CACHE_FORMAT:
            return "checksum of another cache format"
        if expected.get("bytes") != path.stat().st_size or expected.get("sha256") != file_sha256(
            path
        ):
            return "checksum mismatch"
        return None

    def record(
        self, kind: str, parts: dict[str, Any], record_type: type[R], compute: Callable[[], R]
    ) -> R:
        """A cached pydantic record (JSON): ``compute``-d on a miss; an entry that no longer
        validates is damaged, reported and recomputed like any other."""

        def build(path: Path) -> None:
            write_json_atomic(path, compute().model_dump(mode="json"))

        def load(path: Path) -> R:
            try:
                return record_type.model_validate(read_json(path))
            except ValidationError as exc:
                raise CorruptFileError(f"{path}: {exc.errors()[0]['msg']}") from None

        return self.get(kind, parts, "json", build=build, load=load)

    @staticmethod
    def _seal(path: Path) -> None:
        seal = {"format": CACHE_FORMAT, "sha256": file_sha256(path), "bytes": path.stat().st_size}
        write_text_atomic(_seal_path(path), json.dumps(seal) + "\n")


def _seal_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")
