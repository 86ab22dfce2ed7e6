"""The four "why" lenses run on a study's models: gradient alignment, features, spatial and
size sensitivity, quantization strength. Each analysis is sealed in ``analyses/<name>.json``
under a key of everything it depends on (the cells' format: a damaged file is recomputed), so
a resumed study recomputes nothing."""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable

import torch

from quantpatch import analysis
from quantpatch._io import content_key
from quantpatch._runtime import restart_draws
from quantpatch.attacks import Attack, Placement, apply_patch
from quantpatch.metrics import attack_success
from quantpatch.models import predict_logits
from quantpatch.quant import QuantSpec
from quantpatch.results import (
    AlignmentPair,
    Analyses,
    ArchFeatures,
    ArchStrength,
    FeatureLenses,
    GradientAlignment,
    MeanCI,
    RateRecord,
    SizeCurve,
    SizeRow,
    SpatialMap,
    SpatialSensitivity,
    StrengthRow,
)
from quantpatch.study.grid.cells import fit_cached
from quantpatch.study.grid.threat import Source
from quantpatch.study.settings.config import AttackSettings
from quantpatch.study.settings.names import INDEPENDENT_TAG, lowest_precision
from quantpatch.study.store.cache import EVAL_CODE, code_fingerprint
from quantpatch.study.store.run_folder import analysis_path, lock_path
from quantpatch.study.store.sealed import settle
from quantpatch.study.zoo.context import PreparedModel, StudyContext
from quantpatch.study.zoo.models import prepare_fp32, prepare_quantized

Lens = Callable[[StudyContext, AttackSettings], object]


def run_analyses(context: StudyContext) -> Analyses:
    """Every enabled lens, driven by the study's first universal patch attack."""
    settings = context.config.analyses
    universal = next((a for a in context.config.attacks if a.name == "universal"), None)
    if universal is None:
        return Analyses()
    lenses: dict[str, tuple[bool, Lens]] = {
        "gradient_alignment": (settings.gradient_alignment, gradient_alignment),
        "features": (settings.features, features),
        "sensitivity": (settings.spatial, spatial_sensitivity),
        "size_curve": (settings.size_curve, size_curve),
        "quant_strength": (settings.quant_strength, quant_strength),
    }
    results = {
        name: _cached(context, name, lambda lens=lens: lens(context, universal))
        for name, (enabled, lens) in lenses.items()
        if enabled
    }
    return Analyses.model_validate(results)


def _cached(context: StudyContext, name: str, compute: Callable[[], object]) -> object:
    """The lens's typed result, read from its sealed file when its key matches."""
    config = context.config
    key = content_key(
        {
            "analysis": name,
            "settings": config.analyses.model_dump(),
            "models": sorted(m.key for m in context.models.values()),
            "attacks": [a.model_dump() for a in config.attacks],
            "patch_sizes": config.patch_sizes,
            "seeds": config.seeds,
            "n_eval": config.n_eval,
            "qat": config.qat.model_dump(),
            "qat_overrides": config.model_dump(mode="json")["qat_overrides"],
            "code": code_fingerprint(*EVAL_CODE),
        }
    )

    def parse(payload: object) -> object:
        return getattr(Analyses.model_validate({name: payload}), name)

    def dump(result: object) -> object:
        return Analyses.model_validate({name: result}).model_dump(mode="json")[name]

    def timed() -> object:
        started = time.perf_counter()
        result = parse(compute())
        context.log(f"analysis {name} done in {time.perf_counter() - started:.1f} s")
        return result

    return settle(
        "analysis", analysis_path(context.out, name), key, lock_path(context.out, f"analysis-{name}"),
        parse=parse, dump=dump, compute=timed,
    )  # fmt: skip


def universal_patch(
    context: StudyContext, source: PreparedModel, settings: AttackSettings, size: int, seed: int
) -> Attack:
    """The universal patch for ``source`` (shared with the grid's cell when it has one)."""
    attack = settings.create(size, seed, context.progress)
    fit_cached(context, Source.single(source), settings, size, seed, attack)
    return attack


def _centred(patch: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste ``patch`` at the image centre (out of place); return the patched images and the
    (B, 1, H, W) mask of the patch."""
    size, height = patch.shape[-1], images.shape[-1]
    top = (height - size) // 2
    placement = Placement.fixed(images.shape[0], top, top, size)
    patched = apply_patch(images, patch, placement)
    mask = apply_patch(torch.zeros_like(images[:, :1]), torch.ones_like(patch[:1]), placement)
    return patched, mask


def _first_cell(context: StudyContext) -> tuple[int, int]:
    """The patch size and seed the lenses use: the study's first of each."""
    return context.config.patch_sizes[0], context.config.seeds[0]


def _lens_archs(context: StudyContext) -> list[str]:
    """Architectures of the costly lenses (size curve, quantization strength)."""
    return context.config.lens_models


def gradient_alignment(context: StudyContext, settings: AttackSettings) -> GradientAlignment:
    """Input-gradient cosine, Edge IoU and HOG cosine for every pair of PyTorch models, with
    three references on the same images: different images (chance), different images of the
    same class, and an independently trained fp32 model of the same architecture."""
    n = context.config.analyses.n_images
    images, labels = context.eval_images[:n], context.eval_labels[:n]
    size, seed = _first_cell(context)
    inputs = {"clean": images}
    for arch in context.config.models:
        patch = universal_patch(context, context.fp32(arch), settings, size, seed).patch
        inputs[f"patched:{arch}"] = _centred(patch, images)[0]
    # the independent fp32 models are the reference pairs (controls below), never a precision
    models = [m for m in context.models.values() if m.tag != INDEPENDENT_TAG]
    independent = [prepare_fp32(context, arch, independent=True) for arch in context.config.models]
    grads = {
        (m.name, kind): _input_gradients(m.module, x, labels, context.device)
        for m in models + independent
        for kind, x in inputs.items()
    }
    partner, has_partner = _same_class_partner(labels)

    def pairs_of(couples) -> list[AlignmentPair]:
        out = []
        for a, b in couples:
            for kind in inputs:
                if kind.startswith("patched:") and kind.split(":")[1] not in (a.arch, b.arch):
                    continue
                ga, gb = grads[(a.name, kind)], grads[(b.name, kind)]
                metrics = analysis.alignment_metrics(ga, gb, chance=True)
                same = analysis.alignment_metrics(ga[has_partner], gb[partner][has_partner])
                metrics.update({f"{k}_same_class": v for k, v in same.items()})
                stats = {k: MeanCI(**analysis.mean_ci(v)) for k, v in metrics.items()}
                out.append(AlignmentPair(a=a.name, b=b.name, input=kind.partition(":")[0],
                                         **stats))  # fmt: skip
        return out

    controls = [(context.fp32(model.arch), model) for model in independent]
    return GradientAlignment(
        n_images=int(images.shape[0]),
        patch_size=size,
        pairs=pairs_of(itertools.combinations(models, 2)),
        controls=pairs_of(controls),
    )


def _input_gradients(module, images, labels, device) -> torch.Tensor:
    restart_draws(module)  # a random-precision model draws the same precisions every time
    return analysis.input_gradients(module, images, labels, device)


def _same_class_partner(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image, the next image of its class (cyclically), and whether it has one (a
    class seen once pairs with nothing): the same-class reference of the similarity lenses."""
    partner = torch.arange(len(labels))
    for cls in labels.unique():
        members = (labels == cls).nonzero().squeeze(1)
        partner[members] = members.roll(1)
    return partner, partner != torch.arange(len(labels))


def features(context: StudyContext, settings: AttackSettings) -> dict[str, ArchFeatures]:
    """Per architecture: CKA fp32 vs each precision (and vs an independently trained fp32
    model, the reference level), patch dominance, Grad-CAM patch mass."""
    n = context.config.analyses.n_images
    debiased = context.config.analyses.cka == "debiased"
    images = context.eval_images[:n]
    size, seed = _first_cell(context)
    out = {}
    for arch in context.config.models:
        fp32 = context.fp32(arch)
        patch = universal_patch(context, fp32, settings, size, seed).patch
        patched, mask = _centred(patch, images)
        independent = prepare_fp32(context, arch, independent=True)
        out[arch] = ArchFeatures(
            n_images=int(images.shape[0]),
            cka=context.config.analyses.cka,
            cka_independent=analysis.layerwise_cka(
                fp32.module, independent.module, images, context.device, debiased=debiased
            ),
            precisions={
                model.precision: _feature_lenses(context, fp32, model, images, patched, mask)
                for model in context.siblings(arch)
            },
        )
    return out


def _feature_lenses(
    context: StudyContext,
    fp32: PreparedModel,
    model: PreparedModel,
    images: torch.Tensor,
    patched: torch.Tensor,
    mask: torch.Tensor,
) -> FeatureLenses:
    device, module = context.device, model.module
    debiased = context.config.analyses.cka == "debiased"
    layer = analysis.feature_map_layer(module, images[:1].to(device))
    with torch.no_grad():  # these labels feed Grad-CAM's backward pass: not inference tensors
        clean_cls = module(images.to(device)).argmax(1).cpu()
        patched_cls = module(patched.to(device)).argmax(1).cpu()
    mass_clean = analysis.gradcam_patch_mass(module, patched, mask, clean_cls, layer, device)
    mass_patched = analysis.gradcam_patch_mass(module, patched, mask, patched_cls, layer, device)
    cka = functools.partial(analysis.layerwise_cka, fp32.module, module, device=device,
                            debiased=debiased)  # fmt: skip
    return FeatureLenses(
        cka_clean=cka(images),
        cka_patched=cka(patched),
        dominance=analysis.patch_dominance(module, images, patched, mask, device),
        gradcam_layer=layer,
        gradcam_mass_clean_class=MeanCI(**analysis.mean_ci(mass_clean)),
        gradcam_mass_patched_class=MeanCI(**analysis.mean_ci(mass_patched)),
        patch_area_share=float(mask.mean()),
    )


def spatial_sensitivity(context: StudyContext, settings: AttackSettings) -> SpatialSensitivity:
    """ASR of each architecture's fp32 patch at every grid location, on every precision."""
    cfg = context.config.analyses
    size, seed = _first_cell(context)
    n = cfg.spatial_images
    images, labels = context.eval_images[:n], context.eval_labels[:n]
    maps = {}
    for arch in context.config.models:
        patch = universal_patch(context, context.fp32(arch), settings, size, seed).patch
        for model in context.siblings(arch):
            rates, n = analysis.spatial_asr_map(
                model.module,
                patch,
                images,
                labels,
                stride=cfg.spatial_stride,
                device=context.device,
                batch_size=1024,  # bounds peak memory on CPU; larger batches gain little
            )
            maps[model.name] = SpatialMap(source=f"{arch}/fp32", rates=rates.tolist(), n=n)
    return SpatialSensitivity(patch_size=size, stride=cfg.spatial_stride, maps=maps)


def _asr_on(context: StudyContext, attack: Attack, model: PreparedModel) -> RateRecord:
    adversarial = attack.perturb([], context.eval_images, context.eval_labels, context.device)
    clean = _predict(context, model, context.eval_images)
    adv = _predict(context, model, adversarial)
    return RateRecord.of(attack_success(clean, adv, context.eval_labels))


def _predict(context: StudyContext, model: PreparedModel, images: torch.Tensor) -> torch.Tensor:
    return predict_logits(model.module, images, context.device).argmax(1)


def _lowest_precision(context: StudyContext, arch: str) -> PreparedModel:
    models = context.siblings(arch)
    lowest = lowest_precision(m.spec for m in models)
    return next(m for m in models if m.spec == lowest)


def size_curve(context: StudyContext, settings: AttackSettings) -> SizeCurve:
    """ASR vs patch area: white-box on fp32 and transfer fp32 -> the lowest precision."""
    cfg = context.config.analyses
    seed, image = context.config.seeds[0], context.eval_images.shape[-1]
    rows = []
    for arch in _lens_archs(context):
        fp32, low = context.fp32(arch), _lowest_precision(context, arch)
        for fraction in cfg.size_fractions:
            size = analysis.patch_size_pixels(fraction, image)
            on_fp32 = universal_patch(context, fp32, settings, size, seed)
            for kind, target in (("white-box fp32", fp32), (f"fp32 → {low.precision}", low)):
                rate = _asr_on(context, on_fp32, target)
                rows.append(SizeRow(**rate.model_dump(), arch=arch, kind=kind, fraction=fraction,
                                    patch_size=size))  # fmt: skip
    return SizeCurve(rows=rows)


def quant_strength(context: StudyContext, settings: AttackSettings) -> dict[str, ArchStrength]:
    """Separate weight and activation bits: clean accuracy, white-box ASR, fp32-transfer ASR."""
    cfg = context.config.analyses
    size, seed = _first_cell(context)
    images = context.eval_images[: cfg.n_images]
    out = {}
    for arch in _lens_archs(context):
        fp32 = context.fp32(arch)
        fp32_patch = universal_patch(context, fp32, settings, size, seed)
        rows = []
        for axis, bits in itertools.product(("weights", "activations", "both"), cfg.strength_bits):
            spec = _axis_spec(axis, bits)
            # one identical QAT per bit-width: the schedule of quantizing both sides
            qat = context.config.qat_config_for(_axis_spec("both", bits))
            model = prepare_quantized(context, fp32, spec, qat)
            clean = _predict(context, model, context.eval_images)
            own_patch = universal_patch(context, model, settings, size, seed)
            rows.append(
                StrengthRow(
                    axis=axis,
                    bits=bits,
                    precision=spec.name,
                    clean_accuracy=float((clean == context.eval_labels).float().mean()),
                    white_box=_asr_on(context, own_patch, model),
                    fp32_transfer=_asr_on(context, fp32_patch, model),
                    layer_error=analysis.layer_quant_error(
                        fp32.module, model.module, images, context.device
                    ),
                )
            )
        out[arch] = ArchStrength(patch_size=size, rows=rows)
    return out


def _axis_spec(axis: str, bits: int) -> QuantSpec:
    weight = bits if axis in ("weights", "both") else None
    act = bits if axis in ("activations", "both") else None
    return QuantSpec(weight_bits=weight, act_bits=act)
