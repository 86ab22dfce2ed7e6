"""Studies: a validated config expanded into cells, cached, resumable, written as records.

Five rooms, each importing only the ones before it: ``store`` (the artifact cache and the
run folder's sealed files), ``settings`` (the config and naming rules), ``zoo`` (models and
targets), ``grid`` (cells and the threat model) and ``run`` (stages, runner, executors).

The names below load on first use, so validating a config (``settings``) never pays for
the runner's imports: a refused config is answered before the work's modules load."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quantpatch.study.run.runner import run_study
    from quantpatch.study.run.train import train_one
    from quantpatch.study.settings.config import (
        AnalysisSettings,
        AttackSettings,
        Shortcuts,
        StudyConfig,
        load_study,
    )

_HOME = {
    "AnalysisSettings": "quantpatch.study.settings.config",
    "AttackSettings": "quantpatch.study.settings.config",
    "Shortcuts": "quantpatch.study.settings.config",
    "StudyConfig": "quantpatch.study.settings.config",
    "load_study": "quantpatch.study.settings.config",
    "run_study": "quantpatch.study.run.runner",
    "train_one": "quantpatch.study.run.train",
}

__all__ = [
    "AnalysisSettings",
    "AttackSettings",
    "Shortcuts",
    "StudyConfig",
    "load_study",
    "run_study",
    "train_one",
]


def __getattr__(name: str) -> Any:
    """PEP 562: import a public name's room only when someone asks for it."""
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
