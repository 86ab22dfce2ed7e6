"""The work of one cell: craft its adversarial images once, score them on every target it
is scored on, and fill one record per target (RobustBench style: cell x target)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from quantpatch._io import atomic_path, write_json_atomic
from quantpatch.attacks import Attack
from quantpatch.metrics import Rate, attack_outcomes
from quantpatch.results import PATCH_EXAMPLES, CellRecord, CurvePoint, RateRecord, Timings
from quantpatch.study.grid.cells import Cell, fit_cached
from quantpatch.study.grid.threat import adaptive_via, is_adaptive, scored_targets, threat
from quantpatch.study.zoo.context import StudyContext, Target


def run_cell(
    context: StudyContext, cell: Cell, *, executor: str = "local", node: str | None = None
) -> list[CellRecord]:
    """Craft the cell's adversarial images once and score them on every target; the records
    say what ran the cell, where and for how long (the input of a scaling estimate)."""
    started = time.perf_counter()
    records = _score_cell(context, cell)
    where = {"executor": executor, "node": node or socket.gethostname()}
    wall = {"wall_s": time.perf_counter() - started, **where}
    context.log(f"cell {cell.cell_id.rsplit('__', 1)[0]} on {len(records)} targets "
                f"in {wall['wall_s']:.1f} s")  # fmt: skip
    return [r.model_copy(update={"timings": r.timings.model_copy(update=wall)}) for r in records]


def _score_cell(context: StudyContext, cell: Cell) -> list[CellRecord]:
    attack = cell.attack.create(cell.patch_size, cell.seed, context.progress)
    fit_s = fit_cached(context, cell.source, cell.attack, cell.patch_size, cell.seed, attack)
    started = time.perf_counter()
    adversarial = attack.perturb(
        cell.source.predictors(attack), context.eval_images, context.eval_labels, context.device
    )
    perturb_s = time.perf_counter() - started
    patch = getattr(attack, "patch", None)
    target_class = attack.target_class if attack.targeted else None
    records, example_prediction = [], None
    for target in scored_targets(context, cell.source):
        started = time.perf_counter()
        adv_pred = target.predict_labels(adversarial)
        counted, fooled = attack_outcomes(
            target.clean_pred, adv_pred, context.eval_labels, target_class
        )
        timings = Timings(fit_s=fit_s, perturb_s=perturb_s, eval_s=time.perf_counter() - started)
        record = cell_record(context, cell, attack, target, counted, fooled, timings)
        robust = Rate(int((adv_pred == context.eval_labels).sum()), len(context.eval_labels))
        records.append(record.model_copy(update={"robust_accuracy": RateRecord.of(robust)}))
        if _better_example_target(example_prediction, target, cell):
            clean = target.clean_pred
            example_prediction = (target.name, None if clean is None else int(clean[0]),
                                  int(adv_pred[0]))  # fmt: skip
    if isinstance(patch, torch.Tensor):
        save_patch_png(context.out / "patches" / f"{cell.cell_id}.png", patch)
        save_patch_example(context, cell, adversarial[0], example_prediction, target_class)
    return records


def cell_record(
    context: StudyContext,
    cell: Cell,
    attack: Attack,
    target: Target,
    counted: torch.Tensor,
    fooled: torch.Tensor,
    timings: Timings,
) -> CellRecord:
    """One cell scored on one target, with each image's outcome for paired tests."""
    rate = Rate(int(fooled.sum()), int(counted.sum()))
    height, width = context.eval_images.shape[-2:]
    size, source = cell.patch_size, cell.source
    adaptive = is_adaptive(source, attack, target)
    return CellRecord(
        **RateRecord.of(rate).model_dump(),
        study=context.config.name,
        dataset=context.dataset.name,
        cell=cell.cell_id,
        source=source.label,
        source_arch=source.arch,
        source_precision=source.precision,
        target=target.name,
        target_arch=target.arch,
        target_precision=target.precision,
        defense=target.defense,
        threat=threat(source, attack, target),
        mean_queries=_mean_queries(attack),
        adaptive=adaptive,
        adaptive_via=adaptive_via(attack, target) if adaptive else None,
        attack=cell.attack.label,
        attack_name=cell.attack.name,
        attack_kind=attack.kind,
        targeted=attack.targeted,
        target_class=attack.target_class if attack.targeted else None,
        patch_size=size,
        patch_area=size * size / (height * width) if size else None,
        seed=cell.seed,
        replicate=cell.replicate,
        target_clean_accuracy=context.model_record(target.name).clean.rate,
        timings=timings,
        fit_curve=fit_curve_record(attack),
        patch_location=attack.searched_location,
        outcomes=outcome_string(counted, fooled),
    )


def outcome_string(counted: torch.Tensor, fooled: torch.Tensor) -> str:
    """'.' not counted, '0' resisted, '1' fooled, one character per evaluation image."""
    codes = torch.where(counted, fooled.long(), torch.full_like(fooled, -1, dtype=torch.long))
    return "".join(np.array([".", "0", "1"])[codes.numpy() + 1])


def fit_curve_record(attack: Attack) -> list[CurvePoint] | None:
    """The attack's fit curve (fitted now or loaded from the patch cache), None without one."""
    curve = getattr(attack, "fit_curve", None)
    if not curve:
        return None
    return [CurvePoint(step=p.step, loss=p.loss, success=p.success) for p in curve]


def _mean_queries(attack: Attack) -> float | None:
    """Queries per image of a query attack's last run (its ``queries_used``), else None."""
    used = getattr(attack, "queries_used", None)
    if isinstance(used, torch.Tensor) and used.numel():
        return float(used.float().mean())
    return None


def _better_example_target(chosen: tuple[str, int, int] | None, target: Target, cell: Cell) -> bool:
    """Whose prediction the gallery shows: the source model itself; for an ensemble
    (multibit) cell the first target of its architecture; for a source-free one the first."""
    if target.name == cell.source.label:
        return True
    if chosen is not None:
        return False
    return cell.source.arch in (None, target.arch)


def save_patch_example(
    context: StudyContext,
    cell: Cell,
    patched: torch.Tensor,
    prediction: tuple[str, int, int] | None,
    target_class: int | None,
) -> None:
    """The first evaluation image with the cell's patch applied (4x, nearest neighbour) and a
    JSON note of its true class and a model's clean and patched predictions (the source's
    own, where it is a target), for the report's gallery: a patch alone says little until it
    is seen on an image. ``fooled`` follows the ASR rule (untargeted: right when clean, wrong
    when patched; targeted: not the target when clean, the target when patched); None: the
    image does not count."""
    folder = context.out / "patches" / PATCH_EXAMPLES
    save_patch_png(folder / f"{cell.cell_id}.png", patched, upscale=4)
    predicted_by, clean, predicted = prediction if prediction else (None, None, None)
    label = int(context.eval_labels[0])
    fooled = None
    if predicted is not None:
        if target_class is None:
            fooled = predicted != label if clean == label else None
        else:
            fooled = predicted == target_class if label != target_class else None
    write_json_atomic(folder / f"{cell.cell_id}.json", {
        "source": cell.source.label, "attack": cell.attack.label, "patch_size": cell.patch_size,
        "seed": cell.seed, "replicate": cell.replicate, "label": label,
        "clean_prediction": clean, "prediction": predicted, "predicted_by": predicted_by,
        "target_class": target_class, "fooled": fooled,
    })  # fmt: skip


def save_patch_png(path: Path, patch: torch.Tensor, upscale: int = 8) -> None:
    """Save a (C, p, p) patch in [0, 1] as an upscaled PNG (nearest neighbour, crisp pixels)."""
    array = (patch.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round()
    array = np.repeat(np.repeat(array.astype(np.uint8), upscale, 0), upscale, 1)
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
