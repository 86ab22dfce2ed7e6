"""The one file format of a run's finished work (cells and analyses): keyed, sealed, locked.

A file holds the key of what it answers, its payload, and the payload's sha256. A file with
another key is stale and silently recomputed; one whose checksum or payload does not hold up
(cut short, hand-edited) is reported in one line and recomputed. One lock per file lets two
runs of the same study share the work: the second waits, then reads the first one's file."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock
from pydantic import ValidationError

from quantpatch._io import read_json, write_json_atomic
from quantpatch.errors import QuantpatchError
from quantpatch.study.store.cache import warn

T = TypeVar("T")


def settle(
    what: str,
    path: Path,
    key: str,
    lock: Path,
    *,
    parse: Callable[[Any], T],
    dump: Callable[[T], Any],
    compute: Callable[[], T],
) -> T:
    """The value sealed at ``path`` under ``key``, else ``compute()``-d and sealed there;
    ``what`` names the file in the one-line warning about a damaged one ('cell', 'analysis')."""
    with FileLock(lock):
        value = read_sealed(what, path, key, parse)
        if value is None:
            value = compute()
            write_sealed(path, key, dump(value))
    return value


def read_sealed(what: str, path: Path, key: str, parse: Callable[[Any], T]) -> T | None:
    """The parsed payload of ``path`` when it answers ``key`` and its seal holds, else None."""
    if not path.exists():
        return None
    try:
        data = read_json(path)
        if not isinstance(data, dict):
            raise ValueError("not a sealed file")
        if data.get("key") != key:
            return None
        if data.get("sha256") != digest(data["payload"]):
            raise ValueError("checksum mismatch: edited or damaged")
        return parse(data["payload"])
    except (QuantpatchError, ValueError, KeyError, TypeError, AttributeError) as exc:
        problem = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        warn(f"damaged {what} file {path} ({problem.splitlines()[0]}); recomputing it")
        return None


def write_sealed(path: Path, key: str, payload: Any) -> None:
    write_json_atomic(path, {"key": key, "payload": payload, "sha256": digest(payload)})


def digest(payload: Any) -> str:
    """Checksum of a payload: a hand-edited number is caught, not trusted."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
