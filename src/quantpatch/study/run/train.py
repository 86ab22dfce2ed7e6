"""``quantpatch train``: one model at one precision, through the same cache as studies."""

from __future__ import annotations

from pathlib import Path

from quantpatch._runtime import resolve_device
from quantpatch.metrics import Rate
from quantpatch.models import evaluate_accuracy
from quantpatch.quant import QuantSpec
from quantpatch.study.run.checks import validate_study
from quantpatch.study.run.stages import study_dataset
from quantpatch.study.settings.config import StudyConfig, load_study
from quantpatch.study.store.cache import ArtifactCache
from quantpatch.study.zoo.context import StudyContext
from quantpatch.study.zoo.models import prepare_fp32, prepare_quantized


def train_one(
    model: str,
    precision: str = "fp32",
    *,
    dataset: str | None = None,
    data_root: Path | None = None,
    download: bool | None = None,
    limit: int | None = None,
    epochs: int | None = None,
    qat_epochs: int | None = None,
    cache_dir: Path | None = None,
    device: str | None = None,
) -> tuple[Path, Rate]:
    """Train ``model`` (fp32, then quantize/QAT to ``precision``); return checkpoint + accuracy."""
    config = load_study(
        None,
        dataset=dataset,
        data_root=data_root,
        download=download,
        limit=limit,
        models=[model],
        precisions=[precision],
        cache_dir=cache_dir,
        device=device,
    )
    validate_study(config)
    spec = QuantSpec.parse(precision)
    updates: dict = {}
    if epochs is not None:
        updates["train"] = {**config.train.model_dump(), "epochs": epochs}
    if qat_epochs is not None:
        updates["qat"] = {**config.qat_config_for(spec).model_dump(), "epochs": qat_epochs}
        updates["qat_overrides"] = {}
    if updates:  # validated like a study file: negative epochs are refused, not trained
        config = _revalidate(config, updates)
    data = study_dataset(config)
    context = StudyContext(
        config, Path("."), resolve_device(config.device), data, ArtifactCache(config.cache_dir)
    )
    prepared = prepare_quantized(context, prepare_fp32(context, model), spec)
    path = context.cache.root / "models" / f"{prepared.key}.safetensors"
    return path, evaluate_accuracy(prepared.module, data.test, context.device)


def _revalidate(config: StudyConfig, updates: dict) -> StudyConfig:
    return load_study(None, **{**config.model_dump(mode="json", exclude_unset=True), **updates})
