"""Run a study: prepare every model once, then evaluate every cell on every target.

A cell is (source model, attack, patch size, seed). Its adversarial images are made once and
evaluated on every target, so all targets see exactly the same images. Each finished cell is
written to ``cells/<id>.json``; a rerun (or a resumed, interrupted run) skips it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from quantpatch._io import read_json, write_json_atomic, write_text_atomic
from quantpatch._runtime import resolve_device, seed_everything
from quantpatch.attacks import ATTACKS
from quantpatch.data import Dataset, load_dataset
from quantpatch.errors import PatchTooLargeError
from quantpatch.models import MODELS
from quantpatch.study.artifacts import (
    ArtifactCache,
    PreparedModel,
    prepare_fp32,
    prepare_quantized,
)
from quantpatch.study.cells import Cell, expand_cells, run_cell
from quantpatch.study.config import ORT_INT8, StudyConfig
from quantpatch.study.records import model_record, write_results
from quantpatch.study.targets import Target, ort_int8_target, torch_target


@dataclass
class StudyContext:
    """Everything a cell or an analysis needs, prepared once per run."""

    config: StudyConfig
    out: Path
    device: torch.device
    dataset: Dataset
    cache: ArtifactCache
    models: dict[str, PreparedModel] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    model_records: list[dict[str, Any]] = field(default_factory=list)
    progress: bool = True

    @property
    def eval_images(self) -> torch.Tensor:
        return self.dataset.test.images[: self.config.n_eval]

    @property
    def eval_labels(self) -> torch.Tensor:
        return self.dataset.test.labels[: self.config.n_eval]

    def siblings(self, arch: str) -> list[PreparedModel]:
        """Every PyTorch precision of one architecture (the multibit attack's sources)."""
        return [m for m in self.models.values() if m.arch == arch]


def run_study(config: StudyConfig, out: str | Path, *, progress: bool = True) -> Path:
    """Run (or resume) ``config`` into ``out``; returns the path of ``results.json``."""
    out = Path(out)
    validate_names(config)
    context = prepare(config, out, progress=progress)
    records = run_cells(context, expand_cells(context))
    from quantpatch.study.analyses import run_analyses

    analyses = run_analyses(context)
    return write_results(context, records, analyses)


def validate_names(config: StudyConfig) -> None:
    """Fail on unknown names before any expensive work starts."""
    for arch in config.models:
        if not arch.startswith("tv:"):
            MODELS.get(arch)
    for attack in config.attacks:
        ATTACKS.get(attack.name)


def prepare(config: StudyConfig, out: Path, *, progress: bool = True) -> StudyContext:
    seed_everything(config.seeds[0])
    dataset = load_dataset(
        config.dataset, config.data_root, download=config.download, limit=config.limit
    )
    _check_patch_sizes(config, dataset)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", yaml.safe_dump(config.model_dump(mode="json")))
    context = StudyContext(
        config, out, resolve_device(config.device), dataset, ArtifactCache(config.cache_dir)
    )
    context.progress = progress
    _prepare_models(context)
    _prepare_targets(context)
    return context


def _check_patch_sizes(config: StudyConfig, dataset: Dataset) -> None:
    side = min(dataset.train.images.shape[-2:])
    too_big = [p for p in config.patch_sizes if p > side]
    if too_big:
        raise PatchTooLargeError(
            f"patch size {too_big[0]} px is larger than the {side} px images of {dataset.name}"
        )


def _prepare_models(context: StudyContext) -> None:
    config = context.config
    for arch in config.models:
        started = time.perf_counter()
        base = prepare_fp32(
            arch, context.dataset, config, context.cache, context.device, context.progress
        )
        context.models[base.name] = base
        for spec in config.specs:
            if spec.is_float:
                continue
            prepared = prepare_quantized(
                base, spec, context.dataset, config, context.cache, context.device, context.progress
            )
            context.models[prepared.name] = prepared
        if context.progress:
            tqdm.write(f"models for {arch} ready in {time.perf_counter() - started:.1f} s")


def _prepare_targets(context: StudyContext) -> None:
    """Wrap every model as a target, record its clean accuracy, add ORT int8 targets."""
    labels = context.eval_labels
    for prepared in context.models.values():
        target = torch_target(prepared, context.device)
        _add_target(context, target, labels)
    if not context.config.ort_int8:
        return
    for arch in context.config.models:
        base = context.models[f"{arch}/fp32"]
        calib = context.dataset.train.images[:512]
        target, fp32_ort, int8_ort = ort_int8_target(base, calib, context.cache)
        record = _add_target(context, target, labels)
        record["deployment"] = _deployment_check(context, arch, target, fp32_ort, int8_ort)


def _add_target(context: StudyContext, target: Target, labels: torch.Tensor) -> dict[str, Any]:
    target.clean_pred = target.predict_labels(context.eval_images)
    context.targets.append(target)
    record = model_record(context, target, labels)
    context.model_records.append(record)
    return record


def _deployment_check(
    context: StudyContext, arch: str, target: Target, fp32_ort: Any, int8_ort: Any
) -> dict[str, Any]:
    """ORT int8 vs the simulated w8a8 model (agreement) and vs ORT fp32 (speed)."""
    from quantpatch.metrics import Rate
    from quantpatch.quant.onnx import int8_saturates, throughput

    images = context.eval_images
    sim = next((t for t in context.targets if t.name == f"{arch}/w8a8"), None)
    # Timing is the slow part of a rerun; it is measured once per int8 model and reused.
    speed_path = context.cache.path("onnx", {"speed": target.key, "n": len(images)}, "json")
    if speed_path.exists():
        result: dict[str, Any] = read_json(speed_path)
    else:
        result = {
            "int8_img_per_s": throughput(int8_ort, images),
            "fp32_img_per_s": throughput(fp32_ort, images),
        }
        result["speedup_vs_fp32"] = result["int8_img_per_s"] / result["fp32_img_per_s"]
        write_json_atomic(speed_path, result)
    result["reduce_range"] = int8_saturates()  # 7-bit weights on CPUs without VNNI
    if sim is not None and sim.clean_pred is not None and target.clean_pred is not None:
        agree = int((sim.clean_pred == target.clean_pred).sum())
        result["agreement_with"] = sim.name
        result["agreement"] = Rate(agree, int(images.shape[0])).to_dict()
    return result


def run_cells(context: StudyContext, cells: list[Cell]) -> list[dict[str, Any]]:
    """Run every cell not already on disk; return all records (old and new)."""
    records: list[dict[str, Any]] = []
    bar = tqdm(cells, desc="cells", disable=not context.progress)
    for cell in bar:
        bar.set_postfix_str(cell.cell_id[:60])
        path = context.out / "cells" / f"{cell.cell_id}.json"
        cached = _read_cell(path, cell.key)
        if cached is None:
            cached = {"key": cell.key, "records": run_cell(context, cell)}
            write_json_atomic(path, cached)
        records.extend(cached["records"])
    return records


def _read_cell(path: Path, key: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    data = read_json(path)
    return data if data.get("key") == key else None


__all__ = ["ORT_INT8", "StudyContext", "run_study", "prepare", "run_cells"]
