"""Studies: a validated config expanded into cells, cached, resumable, written as records."""

from quantpatch.study.config import AnalysisSettings, AttackSettings, StudyConfig, load_study
from quantpatch.study.runner import run_study
from quantpatch.study.train import train_one

__all__ = [
    "AnalysisSettings",
    "AttackSettings",
    "StudyConfig",
    "load_study",
    "run_study",
    "train_one",
]
