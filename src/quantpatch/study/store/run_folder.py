"""A run folder's layout and its claim: which study it belongs to, where each cell and
analysis file and each lock lives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from filelock import FileLock

from quantpatch._io import read_json, write_json_atomic, write_text_atomic
from quantpatch.errors import ConfigError, QuantpatchError

RUN_MARKER = "run.json"
"""Names the study a run folder belongs to (its settings' fingerprint)."""


def lock_path(out: Path, name: str) -> Path:
    """The lock file of one resource of a run folder (the folder itself, a cell, an analysis)."""
    return out / ".locks" / f"{name}.lock"


def cell_path(out: Path, cell_id: str) -> Path:
    return out / "cells" / f"{cell_id}.json"


def analysis_path(out: Path, name: str) -> Path:
    return out / "analyses" / f"{name}.json"


def claim_run_folder(
    out: Path, study: str, fingerprint: str, settings: dict[str, Any], config_yaml: str
) -> None:
    """A run folder belongs to one study: resuming the same study is fine, a different study
    is refused (its cells and patches would mix with the first one's) before anything is
    written. The claim is made under the folder's lock, so two runs cannot both claim it."""
    _refuse_other_study(out, fingerprint, settings)
    with FileLock(lock_path(out, "run")):
        _refuse_other_study(out, fingerprint, settings)
        marker = {"study": study, "fingerprint": fingerprint, "settings": settings}
        write_json_atomic(out / RUN_MARKER, marker)
        write_text_atomic(out / "config.yaml", config_yaml)


def _refuse_other_study(out: Path, fingerprint: str, settings: dict) -> None:
    marker = out / RUN_MARKER
    if not marker.exists():
        if (out / "results.json").exists() or (out / "cells").exists():
            raise ConfigError(
                f"run folder {out} holds results of an unknown study; use another --out"
            )
        return
    try:
        claimed = read_json(marker)
        if claimed["fingerprint"] == fingerprint:
            return
        differ = sorted(k for k in {*settings, *claimed["settings"]}
                        if settings.get(k) != claimed["settings"].get(k))  # fmt: skip
        theirs = claimed["study"]
    except (QuantpatchError, KeyError, TypeError, AttributeError):
        differ, theirs = ["?"], "an unreadable study"
    raise ConfigError(
        f"run folder {out} belongs to study '{theirs}', which differs in: {', '.join(differ)}; "
        "use another --out (or delete the folder to start over)"
    )
