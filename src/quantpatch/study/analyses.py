"""The four "why" lenses run on a study's models: gradient alignment, features, spatial and
size sensitivity, quantization strength. Each analysis is cached in ``analyses/<name>.json``
under a key of everything it depends on, so a resumed study recomputes nothing."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from quantpatch import analysis
from quantpatch._io import content_key, read_json, write_json_atomic
from quantpatch.attacks import Attack, Placement, apply_patch
from quantpatch.metrics import attack_success
from quantpatch.quant import QuantSpec
from quantpatch.study.artifacts import PreparedModel, prepare_quantized
from quantpatch.study.cells import Cell, fit_cached, make_attack
from quantpatch.study.config import AttackSettings

if TYPE_CHECKING:
    from quantpatch.study.runner import StudyContext


def run_analyses(context: StudyContext) -> dict[str, Any]:
    settings = context.config.analyses
    universal = _patch_attack_settings(context)
    steps: dict[str, tuple[bool, Callable[[StudyContext, AttackSettings], Any]]] = {
        "gradient_alignment": (settings.gradient_alignment, gradient_alignment),
        "features": (settings.features, features),
        "sensitivity": (settings.spatial, spatial_sensitivity),
        "size_curve": (settings.size_curve, size_curve),
        "quant_strength": (settings.quant_strength, quant_strength),
    }
    results: dict[str, Any] = {}
    for name, (enabled, step) in steps.items():
        if enabled and universal is not None:
            results[name] = _cached(context, name, lambda s=step: s(context, universal))
    return results


def _cached(context: StudyContext, name: str, compute: Callable[[], Any]) -> Any:
    key = content_key(
        {
            "analysis": name,
            "settings": context.config.analyses.model_dump(),
            "models": sorted(m.key for m in context.models.values()),
            "attacks": [a.model_dump() for a in context.config.attacks],
            "patch_sizes": context.config.patch_sizes,
            "seeds": context.config.seeds,
            "n_eval": context.config.n_eval,
            "qat": context.config.qat.model_dump(),
            "qat_overrides": {k: v.model_dump() for k, v in context.config.qat_overrides.items()},
        }
    )
    path = context.out / "analyses" / f"{name}.json"
    if path.exists():
        cached = read_json(path)
        if cached.get("key") == key:
            return cached["result"]
    result = compute()
    write_json_atomic(path, {"key": key, "result": result})
    return result


def _patch_attack_settings(context: StudyContext) -> AttackSettings | None:
    """The study's first universal patch attack drives the analyses."""
    return next((a for a in context.config.attacks if a.name == "universal"), None)


def universal_patch(
    context: StudyContext, source: PreparedModel, settings: AttackSettings, size: int, seed: int
) -> Attack:
    """The universal patch for ``source`` (shared with the grid's cell when it has one)."""
    parts = {
        "sources": [source.key],
        "attack": settings.model_dump(),
        "patch_size": size,
        "seed": seed,
    }
    cell = Cell(source.name, (source.name,), settings, size, seed, content_key(parts))
    attack = make_attack(cell, context.progress)
    fit_cached(context, cell, attack, [source])
    return attack


def _centred(context: StudyContext, patch: torch.Tensor, images: torch.Tensor):
    """Paste ``patch`` at the image centre; return patched images and the (B,1,H,W) mask.

    Uses the attacks' out-of-place paste: ``images`` are views of the evaluation set."""
    size, height = patch.shape[-1], images.shape[-1]
    top = (height - size) // 2
    placement = Placement.fixed(images.shape[0], top, top, size)
    patched = apply_patch(images, patch, placement)
    mask = apply_patch(torch.zeros_like(images[:, :1]), torch.ones_like(patch[:1]), placement)
    return patched, mask


def _subset(context: StudyContext, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return context.eval_images[:n], context.eval_labels[:n]


def _arch_models(context: StudyContext, arch: str) -> list[PreparedModel]:
    return context.siblings(arch)


def gradient_alignment(context: StudyContext, settings: AttackSettings) -> dict[str, Any]:
    """Input-gradient cosine, Edge IoU and HOG cosine for every pair of PyTorch models."""
    images, labels = _subset(context, context.config.analyses.n_images)
    size, seed = context.config.patch_sizes[0], context.config.seeds[0]
    inputs = {"clean": images}
    for arch in context.config.models:
        patch = universal_patch(context, context.models[f"{arch}/fp32"], settings, size, seed).patch
        inputs[f"patched:{arch}"] = _centred(context, patch, images)[0]
    models = list(context.models.values())
    grads = {
        (m.name, kind): analysis.input_gradients(m.module, x, labels, context.device)
        for m in models
        for kind, x in inputs.items()
    }
    pairs = []
    for a, b in itertools.combinations(models, 2):
        for kind in inputs:
            if kind.startswith("patched:") and kind.split(":")[1] not in (a.arch, b.arch):
                continue
            ga, gb = grads[(a.name, kind)], grads[(b.name, kind)]
            # Chance level: the same metrics between *different* images (i vs i+1); HOG cosine
            # in particular is high even for unrelated maps, so it needs this reference.
            metrics = {
                **_alignment_metrics(ga, gb),
                **{f"{k}_chance": v for k, v in _alignment_metrics(ga, gb.roll(1, 0)).items()},
            }
            pairs.append(
                {
                    "a": a.name,
                    "b": b.name,
                    "input": "clean" if kind == "clean" else "patched",
                    **{k: analysis.mean_ci(v) for k, v in metrics.items()},
                }
            )
    return {"n_images": int(images.shape[0]), "patch_size": size, "pairs": pairs}


def _alignment_metrics(ga: torch.Tensor, gb: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "cosine": torch.nn.functional.cosine_similarity(ga.flatten(1), gb.flatten(1)),
        "edge_iou": analysis.edge_iou(ga.abs(), gb.abs()),
        "hog_cosine": analysis.hog_cosine(ga.abs(), gb.abs()),
    }


def features(context: StudyContext, settings: AttackSettings) -> dict[str, Any]:
    """Per architecture: CKA fp32 vs each precision, patch dominance, Grad-CAM patch mass."""
    images, labels = _subset(context, context.config.analyses.n_images)
    size, seed = context.config.patch_sizes[0], context.config.seeds[0]
    out: dict[str, Any] = {}
    for arch in context.config.models:
        fp32 = context.models[f"{arch}/fp32"]
        patch = universal_patch(context, fp32, settings, size, seed).patch
        patched, mask = _centred(context, patch, images)
        per_precision = {}
        for model in _arch_models(context, arch):
            per_precision[model.precision] = _feature_lenses(
                context, fp32, model, images, patched, mask
            )
        out[arch] = {"n_images": int(images.shape[0]), "precisions": per_precision}
    return out


def _feature_lenses(
    context: StudyContext,
    fp32: PreparedModel,
    model: PreparedModel,
    images: torch.Tensor,
    patched: torch.Tensor,
    mask: torch.Tensor,
) -> dict[str, Any]:
    device = context.device
    module = model.module
    layer = analysis.last_conv_layer(module)
    with torch.no_grad():  # these labels feed Grad-CAM's backward pass: not inference tensors
        clean_cls = module(images.to(device)).argmax(1).cpu()
        patched_cls = module(patched.to(device)).argmax(1).cpu()
    mass_clean = analysis.gradcam_patch_mass(module, patched, mask, clean_cls, layer, device)
    mass_patched = analysis.gradcam_patch_mass(module, patched, mask, patched_cls, layer, device)
    return {
        "cka_clean": analysis.layerwise_cka(fp32.module, module, images, device),
        "cka_patched": analysis.layerwise_cka(fp32.module, module, patched, device),
        "dominance": analysis.patch_dominance(module, images, patched, mask, device),
        "gradcam_layer": layer,
        "gradcam_mass_clean_class": analysis.mean_ci(mass_clean),
        "gradcam_mass_patched_class": analysis.mean_ci(mass_patched),
        "patch_area_share": float(mask.mean()),
    }


def spatial_sensitivity(context: StudyContext, settings: AttackSettings) -> dict[str, Any]:
    """ASR of each architecture's fp32 patch at every grid location, on every precision."""
    cfg = context.config.analyses
    size, seed = context.config.patch_sizes[0], context.config.seeds[0]
    images, labels = _subset(context, cfg.spatial_images)
    maps = {}
    for arch in context.config.models:
        patch = universal_patch(context, context.models[f"{arch}/fp32"], settings, size, seed).patch
        for model in _arch_models(context, arch):
            rates, n = analysis.spatial_asr_map(
                model.module,
                patch,
                images,
                labels,
                stride=cfg.spatial_stride,
                device=context.device,
                batch_size=1024,  # bounds peak memory on CPU; larger batches gain little
            )
            maps[model.name] = {"source": f"{arch}/fp32", "rates": rates.tolist(), "n": n}
    return {"patch_size": size, "stride": cfg.spatial_stride, "maps": maps}


def _asr_on(context: StudyContext, attack: Attack, model: PreparedModel) -> dict[str, Any]:
    adversarial = attack.perturb([], context.eval_images, context.eval_labels, context.device)
    clean = _predict(context, model, context.eval_images)
    adv = _predict(context, model, adversarial)
    return attack_success(clean, adv, context.eval_labels).to_dict()


def _predict(context: StudyContext, model: PreparedModel, images: torch.Tensor) -> torch.Tensor:
    from quantpatch.models import predict_logits

    return predict_logits(model.module, images, context.device).argmax(1)


def _lowest_precision(context: StudyContext, arch: str) -> PreparedModel:
    quantized = [m for m in _arch_models(context, arch) if m.precision != "fp32"]
    return min(quantized or _arch_models(context, arch), key=lambda m: _bits(m.precision))


def _bits(precision: str) -> int:
    spec = QuantSpec.parse(precision)
    return (spec.weight_bits or 32) + (spec.act_bits or 32)


def size_curve(context: StudyContext, settings: AttackSettings) -> dict[str, Any]:
    """ASR vs patch area: white-box on fp32 and transfer fp32 -> the lowest precision."""
    cfg = context.config.analyses
    seed, image = context.config.seeds[0], context.eval_images.shape[-1]
    rows = []
    for arch in [a for a in cfg.models if a in context.config.models]:
        fp32, low = context.models[f"{arch}/fp32"], _lowest_precision(context, arch)
        for fraction in cfg.size_fractions:
            size = analysis.patch_size_pixels(fraction, image)
            on_fp32 = universal_patch(context, fp32, settings, size, seed)
            for kind, attack, target in (
                ("white-box fp32", on_fp32, fp32),
                (f"fp32 → {low.precision}", on_fp32, low),
            ):
                rows.append(
                    {
                        "arch": arch,
                        "kind": kind,
                        "fraction": fraction,
                        "patch_size": size,
                        **_asr_on(context, attack, target),
                    }  # fmt: skip
                )
    return {"rows": rows}


def quant_strength(context: StudyContext, settings: AttackSettings) -> dict[str, Any]:
    """Separate weight and activation bits: clean accuracy, white-box ASR, fp32-transfer ASR."""
    cfg = context.config.analyses
    size, seed = context.config.patch_sizes[0], context.config.seeds[0]
    out: dict[str, Any] = {}
    for arch in [a for a in cfg.models if a in context.config.models]:
        fp32 = context.models[f"{arch}/fp32"]
        fp32_patch = universal_patch(context, fp32, settings, size, seed)
        images = context.eval_images[: cfg.n_images]
        rows = []
        for axis, bits in itertools.product(("weights", "activations", "both"), cfg.strength_bits):
            spec = _axis_spec(axis, bits)
            model = prepare_quantized(
                fp32,
                spec,
                context.dataset,
                context.config,
                context.cache,
                context.device,
                context.progress,
            )
            clean = _predict(context, model, context.eval_images)
            rows.append(
                {
                    "axis": axis,
                    "bits": bits,
                    "precision": spec.name,
                    "clean_accuracy": float((clean == context.eval_labels).float().mean()),
                    "white_box": _asr_on(
                        context, universal_patch(context, model, settings, size, seed), model
                    ),
                    "fp32_transfer": _asr_on(context, fp32_patch, model),
                    "layer_error": analysis.layer_quant_error(
                        fp32.module, model.module, images, context.device
                    ),
                }
            )
        out[arch] = {"patch_size": size, "rows": rows}
    return out


def _axis_spec(axis: str, bits: int) -> QuantSpec:
    weight = bits if axis in ("weights", "both") else None
    act = bits if axis in ("activations", "both") else None
    return QuantSpec(weight_bits=weight, act_bits=act)
