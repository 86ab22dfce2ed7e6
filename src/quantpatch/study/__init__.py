"""Studies: a validated config expanded into cells, cached, resumable, written as records.

Five rooms, each importing only the ones before it: ``store`` (the artifact cache and the
run folder's sealed files), ``settings`` (the config and naming rules), ``zoo`` (models and
targets), ``grid`` (cells and the threat model) and ``run`` (stages, runner, executors)."""

from quantpatch.study.run.runner import run_study
from quantpatch.study.run.train import train_one
from quantpatch.study.settings.config import (
    AnalysisSettings,
    AttackSettings,
    Shortcuts,
    StudyConfig,
    load_study,
)

__all__ = [
    "AnalysisSettings",
    "AttackSettings",
    "Shortcuts",
    "StudyConfig",
    "load_study",
    "run_study",
    "train_one",
]
